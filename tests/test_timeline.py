"""Horovod timeline summaries: a hand-written timeline with known numbers, and a real one."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stemnet.distributed.timeline import (
    TimelineError,
    format_timeline,
    read_timeline,
    summarize_timeline,
    tensor_ops,
)

HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")


def _meta(pid, name):
    return {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}


def _span(pid, name, begin, end, args=None):
    out = [{"ph": "B", "name": name, "ts": begin, "pid": pid}]
    return out, {"ph": "E", "ts": end, "pid": pid, **({"args": args} if args else {})}


def _reduction(pid, negotiate, op, activities=(), op_name="ALLREDUCE", ranks=()):
    """Events of one reduction: NEGOTIATE (B, X per rank, E), then op B, activities, op E."""
    events = [{"ph": "B", "name": f"NEGOTIATE_{op_name}", "ts": negotiate[0], "pid": pid}]
    events += [{"ph": "X", "name": str(r), "ts": t, "pid": pid, "dur": 0} for r, t in ranks]
    events.append({"ph": "E", "ts": negotiate[1], "pid": pid})
    events.append({"ph": "B", "name": op_name, "ts": op[0], "pid": pid})
    for name, a, b in activities:
        events += [{"ph": "B", "name": name, "ts": a, "pid": pid}, {"ph": "E", "ts": b, "pid": pid}]
    events.append({"ph": "E", "ts": op[1], "pid": pid, "args": {"dtype": "float32", "shape": "[4]"}})
    return events


def hand_timeline():
    """Two gradient tensors A, B over two steps, a broadcast, cycle marks, an open tail.

    Step 0: A negotiates 1000-1500 us (rank 1 late), allreduces 1600-2700;
            B negotiates 3000-3200, allreduces 3300-4300.
    Step 1: A negotiates 10000-10100, B 10300-10500; both in one fused allreduce 10500-11000.
    """
    ev = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": 1}},
          _meta(1, "A"), _meta(2, "B"), _meta(3, "bcast")]
    ev += _reduction(3, (100, 200), (200, 300), op_name="BROADCAST")
    ev += [{"ph": "i", "name": "CYCLE_START", "ts": t, "s": "g"} for t in (900, 2000, 5000, 10050)]
    ev += _reduction(1, (1000, 1500), (1600, 2700), ranks=[(0, 1000), (1, 1500)],
                     activities=[("MEMCPY_IN_FUSION_BUFFER", 1600, 1650), ("GLOO_ALLREDUCE", 1650, 2600),
                                 ("MEMCPY_OUT_FUSION_BUFFER", 2600, 2700)])
    ev += _reduction(2, (3000, 3200), (3300, 4300), activities=[("GLOO_ALLREDUCE", 3300, 4300)])
    ev += _reduction(1, (10000, 10100), (10500, 11000), activities=[("GLOO_ALLREDUCE", 10500, 11000)])
    ev += _reduction(2, (10300, 10500), (10500, 11000), activities=[("GLOO_ALLREDUCE", 10500, 11000)])
    ev.append({"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 20000, "pid": 1})  # cut off here
    return ev


def test_hand_written_timeline_gives_the_exact_summary(tmp_path):
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(hand_timeline()))
    s = summarize_timeline(path)
    assert s.tensors == ["A", "B"] and s.groups == 2
    assert s.other_ops == {"BROADCAST": 1} and s.incomplete == 1 and s.cycles == 4
    assert len(s.steps) == 2
    s0, s1 = s.steps
    # step 0: backprop span 1000 -> 3000 us; communication [1600, 2700] + [3300, 4300] = 2.1 ms,
    # of which [1600, 2700] (1.1 ms) lies inside the span; negotiation 0.5 + 0.2 ms.
    assert (s0.tensors, s0.first_ready_ms, s0.backprop_span_ms) == (2, 1.0, 2.0)
    assert s0.comm_ms == pytest.approx(2.1) and s0.overlapped_ms == pytest.approx(1.1)
    assert s0.exposed_ms == pytest.approx(1.0) and s0.overlap_fraction == pytest.approx(1.1 / 2.1)
    assert s0.negotiation_ms == pytest.approx(0.7) and s0.negotiation_sum_ms == pytest.approx(0.7)
    assert s0.tail_ms == pytest.approx(1.3) and s0.span_ms == pytest.approx(3.3)
    assert s0.cycles == 1  # the mark at 2000 us (900 is before, 5000 after the step)
    assert s0.activities_ms == pytest.approx({"GLOO_ALLREDUCE": 1.95, "MEMCPY_IN_FUSION_BUFFER": 0.05,
                                              "MEMCPY_OUT_FUSION_BUFFER": 0.1})
    # step 1: span 10000 -> 10300; one fused allreduce [10500, 11000] (union, not 2 x 0.5 ms),
    # all after the span: nothing overlapped; negotiation [10000,10100] + [10300,10500].
    assert s1.backprop_span_ms == pytest.approx(0.3) and s1.comm_ms == pytest.approx(0.5)
    assert s1.overlapped_ms == 0 and s1.overlap_fraction == 0 and s1.exposed_ms == pytest.approx(0.5)
    assert s1.negotiation_ms == pytest.approx(0.3) and s1.tail_ms == pytest.approx(0.7)
    assert s1.cycles == 1
    text = format_timeline(s)
    assert "2 steps, 2 tensors in 2 allreduce groups" in text and "52.4" in text


def test_truncated_and_bad_timelines(tmp_path):
    text = json.dumps(hand_timeline())
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.rindex('{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 20000') + 20])
    assert len(summarize_timeline(cut).steps) == 2  # the half-written last event is dropped
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(TimelineError, match="empty.json: empty file"):
        read_timeline(tmp_path / "empty.json")
    with pytest.raises(TimelineError, match="no such timeline file"):
        read_timeline(tmp_path / "missing.json")


def test_grouped_tensors_count_as_one_group():
    ev = [_meta(1, "x/HorovodGroupedAllreduce_a_b_1of2"), _meta(2, "x/HorovodGroupedAllreduce_a_b_2of2"),
          _meta(3, "y/HorovodGroupedAllreduce_c_1of1")]
    for pid in (1, 2, 3):
        ev += _reduction(pid, (10, 20), (30, 40))
    s = summarize_timeline(ev)
    assert len(s.tensors) == 3 and s.groups == 2 and s.steps[0].groups == 2
    ops, incomplete = tensor_ops(ev)
    assert incomplete == 0 and [op.shape for op in ops] == ["[4]"] * 3


TRAIN = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    import time
    import horovod.tensorflow as hvd
    from stemnet.distributed.grouping import make_groups
    hvd.init()
    tf.random.set_seed(0)
    inp = tf.keras.Input((32, 32, 8))
    x = inp
    for name in ("c1", "c2", "c3"):
        x = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu", name=name)(x)
    model = tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 1, name="head")(x))
    variables = model.trainable_variables
    groups = make_groups(model, "graph", group_bytes=4 << 10, first_group_bytes=64)
    opt = tf.keras.optimizers.SGD(0.01)
    data, target = tf.random.normal((8, 32, 32, 8)), tf.random.normal((8, 32, 32, 1))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(data, training=True) - target) ** 2)
        tape = hvd.DistributedGradientTape(tape, groups=groups)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    for _ in range(3):
        step()
    if hvd.rank() == 0:
        print("INFO " + json.dumps({"variables": len(variables), "groups": len(groups)}), flush=True)
    time.sleep(1.0)  # let Horovod's timeline writer thread drain: at exit its last events can be lost
""")


@pytest.mark.slow
@pytest.mark.horovod
def test_a_real_two_rank_timeline_is_summarised(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    timeline = tmp_path / "timeline.json"
    env = dict(os.environ, HOROVOD_TIMELINE=str(timeline), HOROVOD_TIMELINE_MARK_CYCLES="1",
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads(next(l for l in proc.stdout.splitlines() if "INFO " in l).split("INFO ", 1)[1])
    assert info == {"variables": 8, "groups": 4}  # 4 conv layers (kernel + bias), one group each

    s = summarize_timeline(timeline)
    # every gradient tensor of every step is there, in the groups make_groups built
    assert len(s.steps) == 3
    assert len(s.tensors) == info["variables"] and s.groups == info["groups"]
    assert all(step.tensors == info["variables"] and step.groups == info["groups"] for step in s.steps)
    assert s.incomplete == 0 and s.cycles > 0
    for step in s.steps:
        assert step.comm_ms > 0 and step.span_ms >= step.comm_ms - 1e-9
        assert 0.0 <= step.overlap_fraction <= 1.0
        assert step.overlapped_ms + step.exposed_ms == pytest.approx(step.comm_ms)
        assert step.overlapped_ms <= step.backprop_span_ms + 1e-9
        assert step.negotiation_ms >= 0 and step.negotiation_sum_ms >= step.negotiation_ms - 1e-9
        assert step.activities_ms.get("GLOO_ALLREDUCE", 0) > 0
    assert "3 steps, 8 tensors in 4 allreduce groups" in format_timeline(s)
