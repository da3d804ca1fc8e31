"""The training loop: read it top to bottom.

One ``tf.function`` step (forward, float32 loss, gradients through Horovod's
DistributedGradientTape with the configured groups, non-finite steps skipped on every
rank alike), a Python loop around it for validation, TensorBoard, checkpoints and
signals. ``stemnet train`` on an existing run folder resumes it exactly: step, optimizer
state, loss scale, schedule position and data position (epoch, batch) come back from the
last checkpoint. Dropout draws are not restored bit for bit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Dict, Optional


from stemnet.config import Config
from stemnet.errors import UserError
from stemnet.log import get_logger, setup_logging
from stemnet.train import checkpoints
from stemnet.train import run as runfiles
from stemnet.train.lock import RunLock
from stemnet.train.record import BatchRecord

log = get_logger("train")
CHECKPOINT_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # LSF sends SIGUSR2 before the walltime kill


class _StopFlag:
    """Set by SIGTERM/SIGUSR2; the loop checkpoints and leaves at the next step."""

    def __init__(self):
        self.signum: Optional[int] = None

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self):
        for sig in CHECKPOINT_SIGNALS:
            signal.signal(sig, self)


def data_info(manifest: dict, targets) -> dict:
    """Model-facing shapes of a dataset (:class:`~stemnet.train.rundata.RunData`, as a dict)."""
    from stemnet.train.rundata import RunData

    return RunData.from_manifest(manifest, targets).model_dump(mode="json")


def check_compatible(cfg: Config, info: dict, data_dir) -> None:
    """Refuse, before any training, a model whose heads do not match the data's targets."""
    heads = dict(cfg.model.heads)
    for target in info["targets"]:
        if target not in heads:
            raise UserError(f"{data_dir}: target {target!r} has no model head; expected it in model.heads {sorted(heads)}")
        if heads[target] != info["channels"][target]:
            raise UserError(
                f"model.heads.{target}: {heads[target]} channels, but the data's {target!r} has "
                f"{info['channels'][target]}; expected {info['channels'][target]}"
            )
    extra = [h for h in heads if h not in info["targets"]]
    if extra:
        raise UserError(f"model.heads.{extra[0]}: no such target in data.targets {info['targets']}; "
                        "expected a head per target")


def _set_precision(policy: str) -> None:
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy(policy)


def train(cfg: Config, data_dir, run_dir, *, progress: bool = True, max_steps: Optional[int] = None) -> dict:
    """Train (or resume) ``cfg`` on ``data_dir`` into ``run_dir``; returns the summary.

    ``max_steps`` stops early after that many steps *in this call* (for tests and for
    splitting a run); the schedule still spans ``train.steps``.
    """
    import tensorflow as tf
    from tqdm import tqdm

    from stemnet.data import make_dataset, plan_split
    from stemnet.distributed.grouping import describe, make_groups
    from stemnet.distributed.runtime import init_horovod
    from stemnet.models import build_model
    from stemnet.shards import read_manifest
    from stemnet.train.losses import total_loss
    from stemnet.train.optim import EMA, build_optimizer
    from stemnet.train.schedule import WarmupDecay
    from stemnet.train.step import make_train_step

    tcfg, dcfg, hcfg = cfg.train, cfg.data, cfg.distributed
    hvd = init_horovod(hcfg)
    rank, world = hvd.rank(), hvd.size()
    setup_logging()
    run = Path(run_dir)
    data_dir = Path(data_dir)

    # ---- data, shapes, and the checks that must pass before any training
    manifest = read_manifest(data_dir)
    info = data_info(manifest, dcfg.targets)
    check_compatible(cfg, info, data_dir)
    per_epoch = plan_split(manifest, "train", rank=rank, world=world, batch_size=tcfg.batch_size,
                           where=str(data_dir)).batches_per_epoch
    lock = RunLock(run) if rank == 0 else None  # one trainer per run folder; made after the checks
    tf.keras.utils.set_random_seed(tcfg.seed + rank)  # Python, NumPy and TF: Keras initialisers draw from all
    _set_precision(tcfg.precision)
    model = build_model(cfg.model, tuple(info["input_shape"]), tuple(info["output_shape"]))
    lr = WarmupDecay(tcfg.learning_rate * world, tcfg.steps, tcfg.warmup_steps, tcfg.schedule)
    opt = build_optimizer(tcfg, lr)
    opt.build(model.trainable_variables)  # slots exist before the first step: restore/broadcast see them
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
    ema = EMA(model.trainable_variables, tcfg.ema_decay) if tcfg.ema_decay else None
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, step=step, skipped=skipped,
                               **({"ema": ema} if ema is not None else {}))
    manager, candidates = checkpoints.open_manager(ckpt, run / runfiles.CHECKPOINTS, tcfg.keep_checkpoints)
    restored = checkpoints.restore_newest(ckpt, candidates)  # a damaged newest one is skipped
    if restored:
        log.info("resumed %s at step %d", restored, int(step.numpy()))
    if world > 1:  # every rank starts from rank 0's state (fresh or restored)
        hvd.broadcast_variables(model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)

    start_step = int(step.numpy())
    # exact data position on resume: the same epoch order, the batches already seen skipped
    train_ds = make_dataset(
        data_dir, "train", rank=rank, world=world, batch_size=tcfg.batch_size, targets=dcfg.targets,
        shuffle=True, seed=tcfg.seed, augment=dcfg.augment, cbed_normalization=dcfg.cbed_normalization,
        noise_std=dcfg.noise_std, verify_crc=dcfg.verify_crc, repeat=True,
        epoch=start_step // per_epoch, start_batch=start_step % per_epoch, include_index=tcfg.record_batches,
    )
    norm = train_ds.stemnet_normalization
    has_val = manifest["splits"].get("val", {}).get("count", 0) >= world
    if rank == 0:
        runfiles.save_run_files(run, cfg, info, norm.to_dict())

    groups = make_groups(model, hcfg.grouping, group_bytes=int(hcfg.group_bytes_mib * 2**20),
                         first_group_bytes=int(hcfg.first_group_bytes_mib * 2**20))
    fp16 = tcfg.precision == "mixed_float16"
    if world > 1:
        log.info("gradient grouping %s: %s", hcfg.grouping, describe(groups))

    # ---- the step (stemnet.train.step)
    train_step = make_train_step(model, opt, lr, tcfg, step=step, skipped=skipped, hvd=hvd, hcfg=hcfg,
                                 groups=groups, ema=ema)

    @tf.function
    def eval_step(inputs, targets):
        outputs = model(inputs, training=False)
        return total_loss(tcfg.loss, targets, outputs, tcfg.head_weights), outputs

    def validate() -> Dict[str, float]:
        val_ds = make_dataset(data_dir, "val", rank=rank, world=world, batch_size=tcfg.batch_size,
                              targets=dcfg.targets, shuffle=False, cbed_normalization=dcfg.cbed_normalization,
                              verify_crc=dcfg.verify_crc, normalization=norm)
        sums: Dict[str, float] = {}
        count = 0
        for inputs, targets in val_ds:
            losses, _ = eval_step(inputs, targets)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if world > 1:
            means = {k: float(hvd.allreduce(tf.constant(v), name=f"val_{k}", op=hvd.Average)) for k, v in means.items()}
        return means

    writer = tf.summary.create_file_writer(str(run / runfiles.TENSORBOARD)) if rank == 0 else None
    stop = _StopFlag()
    stop.install()
    end_step = tcfg.steps if max_steps is None else min(tcfg.steps, start_step + max_steps)
    bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step",
               disable=not progress or rank != 0, dynamic_ncols=True)
    samples = 0
    t0 = time.perf_counter()
    last_losses: Dict[str, float] = {}
    val_losses: Dict[str, float] = {}
    saved_step = start_step

    def save(reason: str) -> None:
        nonlocal saved_step
        if rank == 0 and int(step.numpy()) != saved_step:
            path = manager.save(checkpoint_number=int(step.numpy()))
            log.debug("checkpoint %s (%s)", path, reason)
        saved_step = int(step.numpy())

    record = BatchRecord(run, rank) if tcfg.record_batches else None
    iterator = iter(train_ds)
    while int(step.numpy()) < end_step:
        inputs, targets = next(iterator)
        if record is not None:
            record.write(int(step.numpy()) + 1, targets, lr(opt.iterations), opt.loss_scale if fp16 else None)
        losses = train_step(inputs, targets)
        current = int(step.numpy())
        samples += int(inputs.shape[0]) * world
        last_losses = {k: float(v) for k, v in losses.items()}
        rate = samples / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{last_losses['total']:.4g}", sps=f"{rate:.1f}")
        if writer is not None:
            with writer.as_default(step=current):
                for key, value in last_losses.items():
                    tf.summary.scalar(f"train/loss_{key}", value)
                tf.summary.scalar("train/lr", float(lr(current - 1)))
                tf.summary.scalar("train/samples_per_s", rate)
                if fp16:
                    tf.summary.scalar("train/loss_scale", float(opt.loss_scale))
        if has_val and (current % tcfg.val_every == 0 or current == end_step):
            val_losses = validate()
            if writer is not None:
                _write_val_summaries(writer, current, val_losses, model, inputs, targets)
        if current % tcfg.checkpoint_every == 0:
            save("periodic")
        if stop.signum is not None:
            save(f"signal {stop.signum}")
            bar.close()
            log.warning("signal %d: checkpoint written at step %d; rerun the same command to resume",
                        stop.signum, current)
            _exit_now(128 + stop.signum, writer)

    bar.close()
    save("end")
    elapsed = time.perf_counter() - t0
    summary = {
        "steps": int(step.numpy()),
        "target_steps": tcfg.steps,
        "steps_this_call": int(step.numpy()) - start_step,
        "rank": rank,
        "world": world,
        "global_batch": tcfg.batch_size * world,
        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "skipped_steps": int(skipped.numpy()),
        "precision": tcfg.precision,
        "train_loss": last_losses,
        "val_loss": val_losses,
        "finished": int(step.numpy()) >= tcfg.steps,
    }
    if rank == 0:
        if summary["finished"]:
            _export(run, model, ema)
        runfiles.write_json_atomic(run / runfiles.SUMMARY, summary)
        writer.flush()
        lock.release()
    return summary


def _exit_now(code: int, writer) -> None:
    """Leave at once once the checkpoint is on disk (flushing logs and TensorBoard first).

    A normal exit here waits 12-20 s in the tf.data iterator's destructor for its input
    workers (seen with gdb: ``RootDataset::Iterator::~Iterator`` → ``LogicalThreadWrapper``);
    a scheduler's grace period after SIGTERM may be shorter than that.
    """
    import logging
    import sys

    if writer is not None:
        writer.flush()
    for handler in logging.getLogger("stemnet").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _export(run: Path, model, ema) -> None:
    """Write the final weights (the EMA averages when configured) to RUN/export."""
    export = run / runfiles.EXPORT
    export.mkdir(parents=True, exist_ok=True)
    tmp = export / f".{runfiles.WEIGHTS}.{os.getpid()}.tmp.h5"
    if ema is not None:
        backup = [v.numpy() for v in model.trainable_variables]
        for v, shadow in zip(model.trainable_variables, ema.shadow):
            v.assign(shadow)
        model.save_weights(str(tmp))
        for v, value in zip(model.trainable_variables, backup):
            v.assign(value)
    else:
        model.save_weights(str(tmp))
    os.replace(tmp, export / runfiles.WEIGHTS)


def _write_val_summaries(writer, step: int, val_losses: Dict[str, float], model, inputs, targets) -> None:
    import tensorflow as tf

    with writer.as_default(step=step):
        for key, value in val_losses.items():
            tf.summary.scalar(f"val/loss_{key}", value)
        outputs = model(inputs[:1], training=False)
        image = inputs[:1, :, :, :1]
        tf.summary.image("inputs", _unit(image))
        for head, prediction in outputs.items():
            if head in targets:
                tf.summary.image(f"{head}/prediction", _unit(prediction[..., :1]))
                tf.summary.image(f"{head}/truth", _unit(targets[head][:1, ..., :1]))


def _unit(x):
    """Scale an image batch to [0, 1] for TensorBoard."""
    import tensorflow as tf

    x = tf.cast(x, tf.float32)
    lo, hi = tf.reduce_min(x), tf.reduce_max(x)
    return (x - lo) / tf.maximum(hi - lo, 1e-12)

