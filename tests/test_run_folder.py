"""The run folder under faults: one trainer at a time, damaged checkpoints, a damaged state file."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_TRAINING

STEMNET = [sys.executable, "-m", "stemnet.cli"]


def train_cmd(run, data, *extra):
    return STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(data), "--out", str(run),
                      "--no-progress", *extra]


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_killed_ones_lock_is_recovered(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run, tiny_dataset, "-o", "train.steps=100000", "-o", "train.checkpoint_every=2"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not list((run / "checkpoints").glob("ckpt-*.index")):  # it holds the lock and trains
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(train_cmd(run, tiny_dataset, "-o", "train.steps=100000"), capture_output=True,
                                text=True, timeout=600)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"another `stemnet train` (pid {first.pid})" in last, second.stderr
        assert "resumed" not in second.stderr  # refused before touching the checkpoints
        assert first.poll() is None  # the first trainer goes on
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the killed trainer's flock: the next one resumes the run
    third = subprocess.run(train_cmd(run, tiny_dataset, "-o", "train.steps=100000", "--max-steps", "1"),
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed" in third.stderr


def test_lock_refuses_a_second_holder_in_process(tmp_path):
    from stemnet.errors import UserError
    from stemnet.train.lock import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run")
    RunLock(tmp_path / "run").release()  # free again once released


def _steps(run):
    return sorted(int(p.name[5:-6]) for p in (run / "checkpoints").glob("ckpt-*.index"))


def _cfg(**overrides):
    from stemnet.config import load_config

    items = {"train.steps": 12, "train.checkpoint_every": 4, "train.keep_checkpoints": 3, "train.val_every": 1000}
    items.update(overrides)
    return load_config(TINY_TRAINING, [f"{k}={v}" for k, v in items.items()], require=("model", "train"))


@pytest.fixture
def three_checkpoints(tiny_dataset, tmp_path):
    from stemnet.train.loop import train

    run = tmp_path / "run"
    train(_cfg(), tiny_dataset, run, progress=False, max_steps=12)
    assert _steps(run) == [4, 8, 12]
    return run


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(three_checkpoints, tiny_dataset, capsys):
    from stemnet.train.loop import train

    run = three_checkpoints
    data = run / "checkpoints" / "ckpt-12.data-00000-of-00001"
    os.truncate(data, data.stat().st_size // 2)
    summary = train(_cfg(**{"train.steps": 14}), tiny_dataset, run, progress=False, max_steps=1)
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / 'ckpt-12'} is unreadable" in err
    assert f"resumed {run / 'checkpoints' / 'ckpt-8'} at step 8" in err
    assert summary["steps"] == 9


@pytest.mark.parametrize("text", ["model_checkpoint_path: \x00\x01 {{{ garbage\n", ""], ids=["garbage", "empty"])
def test_malformed_state_file_falls_back_to_the_checkpoint_files(three_checkpoints, tiny_dataset, capsys, text):
    """TF ignores an unparsable state file (the run would restart from scratch) and raises
    ValueError on an empty one; both are rebuilt from the ckpt-* files, with a warning."""
    from stemnet.train.loop import train

    run = three_checkpoints
    (run / "checkpoints" / "checkpoint").write_text(text)
    summary = train(_cfg(**{"train.steps": 14}), tiny_dataset, run, progress=False, max_steps=1)
    err = capsys.readouterr().err
    assert "unreadable checkpoint state file" in err and "rebuilt from the ckpt-* files" in err
    assert f"resumed {run / 'checkpoints' / 'ckpt-12'} at step 12" in err
    assert summary["steps"] == 13
    # the state file is whole again and names the new checkpoint
    import tensorflow as tf

    assert tf.train.get_checkpoint_state(str(run / "checkpoints")).model_checkpoint_path.endswith("ckpt-13")


def test_no_readable_checkpoint_is_refused(three_checkpoints, tiny_dataset):
    from stemnet.errors import UserError
    from stemnet.train.loop import train

    run = three_checkpoints
    for path in (run / "checkpoints").glob("ckpt-*.data-*"):
        path.write_bytes(b"")
    with pytest.raises(UserError, match="none of the 3 checkpoints reads"):
        train(_cfg(), tiny_dataset, run, progress=False, max_steps=1)
