"""Data-parallel training on real Horovod processes (horovodrun -np 2 --gloo on localhost)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_training

from conftest import TINY_TRAINING

HERE = Path(__file__).resolve().parent
HOROVODRUN = [str(Path(sys.executable).parent / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]
STEMNET = [sys.executable, "-m", "stemnet.cli"]
STRATEGIES = ["none", "count:3", "layer", "graph"]

pytestmark = [pytest.mark.horovod, pytest.mark.slow]


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Two steps on 2 ranks (batch 4 each) = two steps of one process on the batches of 8:
    the same loss at every step and the same final weights, which moved from the initial ones."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    script = str(HERE / "scripts" / "one_step.py")
    single = subprocess.run([sys.executable, script, str(one), *STRATEGIES], capture_output=True, text=True,
                            timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(HOROVODRUN + [sys.executable, script, str(two), *STRATEGIES], capture_output=True,
                           text=True, timeout=900)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    assert_same_training(one, two, multi.stdout, STRATEGIES)


def _weights(npz, prefix):
    return [npz[k] for k in sorted((k for k in npz.files if k.startswith(prefix)), key=lambda k: int(k.split("_")[1]))]


@pytest.mark.parametrize("mode", ["uneven", "allpad"])
def test_padding_on_two_ranks_equals_one_process_on_the_real_samples(tmp_path, mode):
    """Rank 1 holds 2 real samples + 2 weight-0 rows (uneven) or only weight-0 rows (allpad):
    the steps equal one process on the real samples alone, i.e. the gradient is that of the
    mean over the real samples of the global batch."""
    script = str(HERE / "scripts" / "padded_step.py")
    single = subprocess.run([sys.executable, script, str(tmp_path), mode], capture_output=True, text=True,
                            timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / f"{mode}-rank0.npz").rename(tmp_path / "single.npz")
    multi = subprocess.run(HOROVODRUN + [sys.executable, script, str(tmp_path), mode], capture_output=True,
                           text=True, timeout=900)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    ref = np.load(tmp_path / "single.npz")
    for rank in (0, 1):
        got = np.load(tmp_path / f"{mode}-rank{rank}.npz")
        assert int(got["skipped"]) == 0
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
        for w_ref, w_got, w0 in zip(_weights(ref, "final_"), _weights(got, "final_"), _weights(ref, "init_")):
            scale = np.abs(w_ref - w0).max()
            assert scale > 0
            np.testing.assert_allclose(w_got, w_ref, rtol=0, atol=1e-4 * scale + 1e-7)


def test_nan_input_on_one_rank_skips_the_step_on_both(tmp_path):
    script = str(HERE / "scripts" / "padded_step.py")
    multi = subprocess.run(HOROVODRUN + [sys.executable, script, str(tmp_path), "nan"], capture_output=True,
                           text=True, timeout=900)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    ranks = [np.load(tmp_path / f"nan-rank{r}.npz") for r in (0, 1)]
    for got in ranks:
        assert int(got["skipped"]) == 1
        for w_first, w0 in zip(_weights(got, "first_"), _weights(got, "init_")):
            np.testing.assert_array_equal(w_first, w0)  # the NaN step changed nothing
        assert np.isfinite(got["losses"][1])
        assert any(np.abs(f - w0).max() > 0 for f, w0 in zip(_weights(got, "final_"), _weights(got, "init_")))
    for a, b in zip(_weights(ranks[0], "final_"), _weights(ranks[1], "final_")):
        np.testing.assert_array_equal(a, b)  # and the ranks stayed in step


def _train(run, data, *extra, timeout=900):
    return subprocess.run(HOROVODRUN + STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(data),
                                                  "--out", str(run), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=timeout)


def test_two_rank_training_resumes_and_only_rank0_writes(tiny_dataset, tmp_path):
    from stemnet.train.record import read_record

    run = tmp_path / "run"
    first = _train(run, tiny_dataset, "-o", "train.steps=4", "-o", "train.checkpoint_every=2",
                   "-o", "train.record_batches=true")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "trained to step 4/4 on 2 rank(s)" in first.stdout
    # learning rate x world size: tiny.yaml's 0.003, 2 warm-up steps, cosine over 4 steps, on 2 ranks
    for rank in (0, 1):
        lrs = [line["lr"] for _, line in sorted(read_record(run, rank).items())]
        np.testing.assert_allclose(lrs, [0.003, 0.006, 0.006, 0.003], rtol=1e-6)
    seen = [set(line["index"]) for r in (0, 1) for line in read_record(run, r).values()]
    assert not seen[0] & seen[4]  # the two ranks read different samples
    assert first.stdout.count("trained to step") == 1  # rank 1 prints no summary
    assert len(list((run / "tensorboard").glob("events.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("*.index")) == ["ckpt-2.index", "ckpt-4.index"]
    second = _train(run, tiny_dataset, "-o", "train.steps=6", "-o", "train.checkpoint_every=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 4" in second.stdout + second.stderr
    assert "trained to step 6/6 on 2 rank(s)" in second.stdout


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rank_pids(rank: int, launcher: int):
    """Processes of rank ``rank`` started by this test's horovodrun (pid ``launcher``) only:
    other jobs on the machine are left alone."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"HOROVOD_RANK={rank}".encode() in environ and b"stemnet.cli" in cmdline
                and _descends_from(int(proc.name), launcher)):
            pids.append(int(proc.name))
    return pids


def test_killed_rank_ends_the_job_with_an_error(tiny_dataset, tmp_path):
    """SIGKILL one rank: horovodrun exits non-zero, rank 0 ends too; checkpoints stay valid."""
    run = tmp_path / "run"
    cmd = HOROVODRUN + STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(tiny_dataset),
                                  "--out", str(run), "--no-progress", "-o", "train.steps=100000",
                                  "-o", "train.checkpoint_every=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("ckpt-*.index")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    victims = _rank_pids(1, proc.pid)
    survivors = _rank_pids(0, proc.pid)
    assert victims, "rank 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=600)  # a guard against a hang, not a speed test
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert survivors and not any(_alive(pid) for pid in survivors)  # the job ended: rank 0 did not live on
    assert "exit code" in output.lower() or "error" in output.lower(), output[-2000:]
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) % 3 == 0
