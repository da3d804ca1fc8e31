"""Data-parallel training on real Horovod processes (horovodrun -np 2 --gloo on localhost)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TRAINING

HERE = Path(__file__).resolve().parent
HOROVODRUN = [str(Path(sys.executable).parent / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
STEMNET = [sys.executable, "-m", "stemnet.cli"]
STRATEGIES = ["none", "count:3", "layer", "graph"]

pytestmark = pytest.mark.horovod


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """One step on 2 ranks (batch 4 each) = one step of one process on the batch of 8."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    script = str(HERE / "scripts" / "one_step.py")
    single = subprocess.run([sys.executable, script, str(one), *STRATEGIES], capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(HOROVODRUN + [sys.executable, script, str(two), *STRATEGIES], capture_output=True,
                           text=True, timeout=400)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    groups = dict(line.split()[1:3] for line in multi.stdout.splitlines() if "STEP " in line)
    assert int(groups["graph"].split("=")[1]) > 1 and int(groups["layer"].split("=")[1]) > 3
    for strategy in STRATEGIES:
        name = strategy.replace(":", "_") + ".npz"
        a, b = np.load(one / name), np.load(two / name)
        assert len(a.files) == len(b.files) > 10
        for key in a.files:
            ref, got = a[key], b[key]
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                       err_msg=f"{strategy}: variable {key}")
    # the step really moved the weights (a test that cannot pass by doing nothing)
    start = np.load(one / "none.npz")
    assert any(np.abs(start[k]).max() > 0 for k in start.files)


def _train(run, data, *extra, timeout=400):
    return subprocess.run(HOROVODRUN + STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(data),
                                                  "--out", str(run), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=timeout)


def test_two_rank_training_resumes_and_only_rank0_writes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    first = _train(run, tiny_dataset, "-o", "train.steps=4", "-o", "train.checkpoint_every=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "trained to step 4/4 on 2 rank(s)" in first.stdout
    assert first.stdout.count("trained to step") == 1  # rank 1 prints no summary
    assert len(list((run / "tensorboard").glob("events.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("*.index")) == ["ckpt-2.index", "ckpt-4.index"]
    second = _train(run, tiny_dataset, "-o", "train.steps=6", "-o", "train.checkpoint_every=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 4" in second.stdout + second.stderr
    assert "trained to step 6/6 on 2 rank(s)" in second.stdout


def _rank_pids(rank: int):
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOROVOD_RANK={rank}".encode() in environ and b"stemnet.cli" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_killed_rank_ends_the_job_with_an_error(tiny_dataset, tmp_path):
    """SIGKILL one rank: horovodrun exits non-zero within a bounded time; checkpoints stay valid."""
    run = tmp_path / "run"
    cmd = HOROVODRUN + STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(tiny_dataset),
                                  "--out", str(run), "--no-progress", "-o", "train.steps=100000",
                                  "-o", "train.checkpoint_every=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("ckpt-*.index")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    victims = _rank_pids(1)
    assert victims, "rank 1 not found"
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
    assert "exit code" in output.lower() or "error" in output.lower(), output[-2000:]
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) % 3 == 0
