"""Training loop on the tiny simulated dataset: overfit, precisions, checkpoints, signals."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stemnet.config import load_config

from conftest import TINY_TRAINING

STEMNET = [sys.executable, "-m", "stemnet.cli"]


def tiny(**overrides):
    items = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(TINY_TRAINING, items, require=("model", "train"))


def checkpoints(run: Path):
    return sorted(int(p.name[5:-6]) for p in (run / "checkpoints").glob("ckpt-*.index"))


@pytest.mark.slow
def test_overfits_tiny_dataset(tiny_dataset, tmp_path):
    """Training loss on six samples falls at least 10x (first step vs the last)."""
    from stemnet.train.loop import train

    cfg = tiny(**{"train.steps": 300, "train.learning_rate": 0.003, "train.warmup_steps": 0,
                  "train.schedule": "constant", "data.augment": "false", "train.val_every": 1000,
                  "train.checkpoint_every": 1000})
    first = train(cfg, tiny_dataset, tmp_path / "run", progress=False, max_steps=1)
    last = train(cfg, tiny_dataset, tmp_path / "run", progress=False)
    assert first["steps"] == 1 and last["steps"] == 300 and last["finished"]
    assert last["train_loss"]["total"] <= first["train_loss"]["total"] / 10, (first, last)
    assert last["skipped_steps"] == 0


def test_export_reloads_with_the_same_predictions(tiny_dataset, tmp_path):
    """The exported weights (h5) and the last checkpoint give identical predictions."""
    import tensorflow as tf

    from stemnet.data import make_dataset
    from stemnet.models import build_model
    from stemnet.train.loop import train
    from stemnet.train.run import load_run

    cfg = tiny(**{"train.steps": 6, "train.checkpoint_every": 3})
    run = tmp_path / "run"
    train(cfg, tiny_dataset, run, progress=False)
    model, loaded_cfg, info, norm = load_run(run)
    assert loaded_cfg.model == cfg.model and info["input_shape"] == [16, 16, 9]
    fresh = build_model(cfg.model, tuple(info["input_shape"]), tuple(info["output_shape"]))
    tf.train.Checkpoint(model=fresh).restore(str(run / "checkpoints" / "ckpt-6")).expect_partial()
    inputs, _ = next(iter(make_dataset(tiny_dataset, "test", batch_size=3, shuffle=False)))
    a, b = model(inputs, training=False), fresh(inputs, training=False)
    for head in a:
        np.testing.assert_array_equal(a[head].numpy(), b[head].numpy())
    assert float(tf.math.reduce_std(a["potential"])) > 0


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_precision_policies_give_finite_losses(tiny_dataset, tmp_path, policy):
    import tensorflow as tf

    from stemnet.train.loop import train

    try:
        summary = train(tiny(**{"train.steps": 3, "train.precision": policy}), tiny_dataset,
                        tmp_path / policy, progress=False)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert summary["steps"] == 3
    assert all(np.isfinite(v) for v in summary["train_loss"].values())
    assert summary["skipped_steps"] <= (2 if policy == "mixed_float16" else 0)  # initial loss-scale probing


def _start(run, data, *extra):
    cmd = STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(data), "--out", str(run),
                     "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-2000:])
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_sigkill_then_resume_continues_from_last_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, tiny_dataset, "-o", "train.steps=100000", "-o", "train.checkpoint_every=4")
    _wait_for(lambda: len(checkpoints(run)) >= 2, proc)
    proc.kill()
    proc.wait()
    # the last *committed* checkpoint: a kill between writing ckpt-N's files and updating
    # the manager's state file leaves ckpt-N unused, and the run resumes from the one before
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(run / "checkpoints"))
    last = int(Path(state.model_checkpoint_path).name[5:])
    assert last % 4 == 0 and last >= 4 and last in checkpoints(run)
    resumed = subprocess.run(STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(tiny_dataset),
                                        "--out", str(run), "--no-progress", "--max-steps", "3",
                                        "-o", "train.steps=100000", "-o", "train.checkpoint_every=4"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run / 'checkpoints' / f'ckpt-{last}'} at step {last}" in resumed.stderr
    assert f"trained to step {last + 3}/100000" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_writes_a_checkpoint_before_exit(tiny_dataset, tmp_path, sig):
    run = tmp_path / "run"
    proc = _start(run, tiny_dataset, "-o", "train.steps=100000", "-o", "train.checkpoint_every=5")
    _wait_for(lambda: checkpoints(run) == [5], proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    match = re.search(r"checkpoint written at step (\d+)", err)
    assert match, err
    assert checkpoints(run)[-1] == int(match.group(1)) >= 5


@pytest.mark.parametrize("override,message", [
    ("model.heads.displacement=6", "model.heads.displacement: 6 channels, but the data's 'displacement' has 9"),
    ("data.targets=[potential]", "model.heads.displacement: no such target in data.targets"),
])
def test_config_data_mismatch_is_refused(tiny_dataset, tmp_path, override, message):
    proc = subprocess.run(STEMNET + ["train", "--config", str(TINY_TRAINING), "--data", str(tiny_dataset),
                                     "--out", str(tmp_path / "run"), "-o", override],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lars_clipping_and_ema_export(tiny_dataset, tmp_path):
    """LARC + clipping train finitely; with EMA the exported weights are the averages."""
    import tensorflow as tf

    from stemnet.models import build_model
    from stemnet.train.loop import train
    from stemnet.train.run import load_run

    cfg = tiny(**{"train.steps": 4, "train.lars": "true", "train.clip_norm": 0.5, "train.ema_decay": 0.5,
                  "train.optimizer": "sgd", "train.checkpoint_every": 4})
    run = tmp_path / "run"
    summary = train(cfg, tiny_dataset, run, progress=False)
    assert summary["steps"] == 4 and all(np.isfinite(v) for v in summary["train_loss"].values())
    exported, _, info, _ = load_run(run)
    raw = build_model(cfg.model, tuple(info["input_shape"]), tuple(info["output_shape"]))
    tf.train.Checkpoint(model=raw).restore(str(run / "checkpoints" / "ckpt-4")).expect_partial()
    diffs = [np.abs(a.numpy() - b.numpy()).max() for a, b in zip(exported.trainable_variables, raw.trainable_variables)]
    assert max(diffs) > 0  # EMA averages differ from the last weights
