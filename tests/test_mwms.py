"""Data-parallel training on real tf.distribute MultiWorkerMirroredStrategy workers (localhost).

Workers are started by ``stemnet launch -n 2`` (a TF_CONFIG each on free loopback ports),
the way a user runs MWMS on one machine; on a cluster TF_CONFIG comes from Slurm or LSF.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_training

from conftest import TINY_TRAINING

HERE = Path(__file__).resolve().parent
STEMNET = [sys.executable, "-m", "stemnet.cli"]
LAUNCH = STEMNET + ["launch", "-n", "2", "--"]
STRATEGIES = ["none", "count:3", "layer", "graph"]
PACK_BYTES = int(0.004 * 2**20)  # one_step.py's distributed.fusion_threshold_mib (the `none` pack size)

pytestmark = [pytest.mark.mwms, pytest.mark.slow]


def _env():
    return dict(os.environ, STEMNET_BACKEND="mwms")


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory):
    """One SGD step per strategy: 1 MWMS process on the batch of 8, and 2 workers on 4 each."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    script = str(HERE / "scripts" / "one_step.py")
    single = subprocess.run([sys.executable, script, str(one), *STRATEGIES], capture_output=True, text=True,
                            timeout=1800, env=_env())
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(LAUNCH + [sys.executable, script, str(two), *STRATEGIES], capture_output=True,
                           text=True, timeout=2400, env=_env())
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    return one, two, multi.stdout


def test_two_workers_equal_one_process_on_the_concatenated_batch(one_step_runs):
    """Two steps on 2 workers (batch 4 each) = two steps of one process on the batches of 8:
    the same loss at every step and the same final weights, which moved from the initial ones."""
    one, two, stdout = one_step_runs
    assert_same_training(one, two, stdout, STRATEGIES)


def _tf_packs(sizes_in_variable_order, bytes_per_pack):
    """TensorFlow's group_by_size on the reversed list: packs grow until they exceed the budget."""
    packs, last = [], 0
    for size in reversed(sizes_in_variable_order):
        if not packs or last > bytes_per_pack:
            packs.append(0)
            last = 0
        packs[-1] += size
        last += size * 4
    return packs


def test_groups_are_issued_in_the_recorded_backprop_order(one_step_runs):
    """The traced step's collectives: the global weight sum, then one per gradient group in
    backprop order (each the group's size), then the three loss sums (potential,
    displacement, total) of the global-batch mean."""
    _, two, _ = one_step_runs
    for strategy in STRATEGIES:
        order = json.loads((two / (strategy.replace(":", "_") + ".order.json")).read_text())
        issued, sizes, layers = order["issued"], order["variable_sizes"], order["backprop_layers"]
        collectives = order["collective_sizes"]
        assert collectives[0] == 1 and collectives[-3:] == [1, 1, 1], collectives
        gradients = collectives[1:-3]
        if strategy == "none":  # one call; TensorFlow packs it (reversed, packs of at least B)
            assert issued == [list(range(len(sizes)))]
            assert gradients == _tf_packs(sizes, PACK_BYTES)
            assert len(gradients) > 1
            continue
        assert gradients == [sum(sizes[i] for i in group) for group in issued], strategy
        flat = [i for group in issued for i in group]
        assert sorted(flat) == list(range(len(sizes)))
        if strategy == "layer":
            assert issued == layers
        if strategy == "graph":  # whole layers, in backprop order, packed
            assert flat == [i for layer in layers for i in layer]
            starts = {layer[0] for layer in layers}
            assert all(group[0] in starts for group in issued) and len(issued) < len(layers)
        if strategy == "count:3":
            assert len(issued) == 3 and flat == list(range(len(sizes)))


def _train(run, data, *extra, env=None, timeout=1800):
    return subprocess.run(LAUNCH + STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(data),
                                              "--out", str(run), "--no-progress", "-o", "distributed.backend=mwms",
                                              "-o", "train.steps=6", "-o", "train.checkpoint_every=2", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _checkpoint_tensors(run):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run / "checkpoints")))
    skip = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")  # counts saves
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k not in skip}


BATCH_NORM_STATISTICS = ("moving_mean/.ATTRIBUTES/VARIABLE_VALUE", "moving_variance/.ATTRIBUTES/VARIABLE_VALUE")
RUN_FILES = [".lock", "checkpoints", "config.yaml", "data.json", "export", "normalization.json", "summary.json",
             "tensorboard"]


def test_two_worker_training_resumes_and_only_rank0_writes(tiny_dataset, tmp_path):
    """6 steps on 2 workers, stopped after 4 (``--max-steps``) and resumed by the same command,
    end with the checkpoint of 6 uninterrupted steps: weights, batch-norm statistics, Adam
    slots and counters equal (so the schedule and data position came back too, and both
    workers started the second call from rank 0's restored state). Rank 0 alone writes the
    run folder; rank 1 writes to a scratch folder it removes.

    Bit for bit except the batch-norm moving statistics: under MWMS each worker keeps its
    own (on-read synchronised variables) and a checkpoint stores their mean, so after the
    resume both workers go on from the mean. The update is linear, so the saved mean of
    step 6 is the same number, rounded differently (1-2 float32 ulp measured)."""
    import numpy as np

    scratch = tmp_path / "tmp"  # rank 1's checkpoint scratch (tempfile) lands here
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    straight, run = tmp_path / "straight", tmp_path / "run"
    full = _train(straight, tiny_dataset, env=env)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "trained to step 6/6 on 2 rank(s)" in full.stdout

    first = _train(run, tiny_dataset, "--max-steps", "4", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "trained to step 4/6 on 2 rank(s)" in first.stdout
    assert first.stdout.count("trained to step") == 1  # rank 1 prints no summary
    assert len(list((run / "tensorboard").glob("events.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("*.index")) == ["ckpt-2.index", "ckpt-4.index"]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["backend"], summary["rank"], summary["world"], summary["steps"]) == ("mwms", 0, 2, 4)
    assert not summary["finished"] and not (run / "export").exists()
    stopped = _checkpoint_tensors(run)
    assert int(stopped["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 4

    second = _train(run, tiny_dataset, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed {run / 'checkpoints' / 'ckpt-4'} at step 4" in second.stdout + second.stderr
    assert "trained to step 6/6 on 2 rank(s)" in second.stdout
    assert second.stdout.count("trained to step") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_call"], summary["finished"]) == (6, 2, True)
    assert (run / "export" / "weights.h5").is_file()

    want, got = _checkpoint_tensors(straight), _checkpoint_tensors(run)
    assert sorted(got) == sorted(want)
    assert len([k for k in got if k.startswith("optimizer/")]) > 10  # Adam's slots are compared too
    assert int(got["step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    moved = 0.0
    for key in want:
        if key.endswith(BATCH_NORM_STATISTICS):  # equal up to float32 rounding: see the docstring
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-8, err_msg=key)
        else:  # weights, Adam's slots and iterations, step counters: bit for bit
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        if key in stopped and want[key].dtype.kind == "f" and key.startswith("model/"):
            moved = max(moved, float(np.abs(want[key] - stopped[key]).max()))
    assert moved > 0  # steps 5 and 6 changed the weights: the equality is not that of step 4

    # only rank 0 wrote: the run folder holds one writer's files (a TensorBoard file per call)
    for folder in (run, straight):
        assert sorted(p.name for p in folder.iterdir()) == RUN_FILES, sorted(p.name for p in folder.iterdir())
    assert len(list((run / "tensorboard").glob("events.*"))) == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("*.index")) == ["ckpt-4.index", "ckpt-6.index"]
    assert not list(scratch.glob("stemnet-scratch-*"))  # rank 1's checkpoints went to scratch, removed


def _worker_pids(index: int):
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        configs = [e for e in environ if e.startswith(b"TF_CONFIG=")]
        if configs and b"train" in cmdline and b"launch" not in cmdline:
            if json.loads(configs[0].split(b"=", 1)[1])["task"]["index"] == index:
                pids.append(int(proc.name))
    return pids


def test_killed_worker_makes_launch_exit_nonzero_with_a_valid_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    cmd = LAUNCH + STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(tiny_dataset),
                              "--out", str(run), "--no-progress", "-o", "train.steps=100000",
                              "-o", "train.checkpoint_every=3", "-o", "distributed.backend=mwms"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 1200
    while not list((run / "checkpoints").glob("ckpt-*.index")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    victims = _worker_pids(1)
    assert victims, "worker 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 120
    assert "worker 1 exited with code" in output or "worker 0 exited with code" in output, output[-2000:]
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) % 3 == 0
