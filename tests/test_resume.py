"""Exact resume and reproducible seeds, on real `stemnet train` processes (CPU).

N steps straight vs. the same run stopped part-way (once by SIGKILL, once by SIGTERM) and
resumed to N: every tensor of the final checkpoint (weights, batch-norm statistics, Adam
slots, iteration and step counters) is equal bit for bit, and so is what each step saw
(`train.record_batches`: the sample indices and weights of the batch, the learning rate
and the loss scale it used). Two fresh runs with one seed give bit-identical checkpoints.
The model has no dropout (tiny config), so nothing here is drawn outside the seeds.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TRAINING

pytestmark = pytest.mark.slow  # `make test-all` (CI); see README, Tests

STEMNET = [sys.executable, "-m", "stemnet.cli"]
STEPS = 16
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=4", "train.val_every=1000",
             "train.record_batches=true", "train.keep_checkpoints=2"]


def command(run, data, *extra):
    cmd = STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(data), "--out", str(run), "--no-progress"]
    for item in OVERRIDES + list(extra):
        cmd += ["-o", item]
    return cmd


def start(run, data, *extra):
    return subprocess.Popen(command(run, data, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def committed_step(run):
    """The step of the checkpoint the state file names (None before the first)."""
    import tensorflow as tf

    try:
        state = tf.train.get_checkpoint_state(str(run / "checkpoints"))
    except Exception:  # being rewritten right now
        return None
    return int(Path(state.model_checkpoint_path).name[5:]) if state and state.model_checkpoint_path else None


def checkpoint_tensors(run):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run / "checkpoints")))
    # save_counter counts saves (a SIGTERM adds one), not training state
    skip = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k not in skip}


def assert_bit_equal(a, b):
    assert sorted(a) == sorted(b)
    slots = [k for k in a if k.startswith("optimizer/_variables/")]
    assert len(slots) > 10, sorted(a)  # Adam's moments are among what is compared
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def interrupted(run, data, sig):
    """Start the run, stop it with ``sig`` once a checkpoint is committed, resume to the end.

    Returns (step the resume started from, the resumed process's stderr).
    """
    proc = start(run, data)
    deadline = time.monotonic() + 600
    while committed_step(run) is None:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), err[-2000:]
    stopped = committed_step(run)
    assert 0 < stopped < STEPS  # really interrupted part-way
    _, err = finish(start(run, data))
    assert f"resumed {run / 'checkpoints' / f'ckpt-{stopped}'} at step {stopped}" in err
    return stopped, err


@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory):
    """Two fresh uninterrupted runs of the same config and seed (in parallel)."""
    root = tmp_path_factory.mktemp("straight")
    runs = [root / "a", root / "b"]
    procs = [start(run, tiny_dataset) for run in runs]
    for proc in procs:
        finish(proc)
    return runs


def test_same_seed_gives_bit_identical_runs(straight):
    from stemnet.train.record import read_record

    a, b = straight
    assert_bit_equal(checkpoint_tensors(a), checkpoint_tensors(b))
    assert read_record(a) == read_record(b)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupted_run_resumes_exactly(straight, tiny_dataset, tmp_path, sig):
    from stemnet.train.record import read_record

    run = tmp_path / "run"
    stopped, _ = interrupted(run, tiny_dataset, sig)
    assert_bit_equal(checkpoint_tensors(straight[0]), checkpoint_tensors(run))
    want, got = read_record(straight[0]), read_record(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # the indices, weights, lr and loss scale of every step
        assert got[step] == want[step], step
    # the record is not constant: a resume that restarted the data or the schedule would differ
    assert len({tuple(want[s]["index"]) for s in range(1, STEPS + 1)}) > 3
    assert len({want[s]["lr"] for s in range(stopped + 1, STEPS + 1)}) > 3


def test_mixed_float16_resume_restores_the_loss_scale(tiny_dataset, tmp_path):
    """Under mixed_float16 the loss scale and its growth counter come back with the run."""
    import tensorflow as tf

    from stemnet.config import load_config
    from stemnet.train.loop import train
    from stemnet.train.record import read_record

    cfg = load_config(TINY_TRAINING, OVERRIDES + ["train.precision=mixed_float16", "train.steps=8"],
                      require=("model", "train"))
    try:
        train(cfg, tiny_dataset, tmp_path / "straight", progress=False)
        train(cfg, tiny_dataset, tmp_path / "split", progress=False, max_steps=4)
        train(cfg, tiny_dataset, tmp_path / "split", progress=False)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "split")
    scale = "optimizer/loss_scale/current_loss_scale/.ATTRIBUTES/VARIABLE_VALUE"
    good = "optimizer/loss_scale/good_steps/.ATTRIBUTES/VARIABLE_VALUE"
    assert b[good] == a[good] and int(a[good]) >= 6  # counted across the split, not from 0 again
    assert b[scale] == a[scale]
    assert_bit_equal(a, b)
    want, got = read_record(tmp_path / "straight"), read_record(tmp_path / "split")
    assert [got[s]["loss_scale"] for s in range(1, 9)] == [want[s]["loss_scale"] for s in range(1, 9)]
    assert got == want
