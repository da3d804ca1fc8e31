"""The training loop: read it top to bottom.

One ``tf.function`` step (forward, float32 loss, gradients reduced over the ranks by the
distributed backend in the configured groups, non-finite steps skipped on every rank
alike), a flat Python loop around it for logging, validation, TensorBoard, checkpoints and
signals. The backend (Horovod or tf.distribute MWMS, :mod:`stemnet.distributed.backends`)
is chosen by the config; the loop does not know which one runs it. ``stemnet train`` on an
existing run folder resumes it exactly: step, optimizer state, loss scale, schedule
position and data position (epoch, batch) come back from the last checkpoint. Dropout
draws are not restored bit for bit.
"""

from __future__ import annotations

import os
import signal
import tempfile
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
from stemnet.train.rundata import RunData

log = get_logger("train")
CHECKPOINT_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # LSF sends SIGUSR2 before the walltime kill


class StopFlag:
    """Set by SIGTERM/SIGUSR2; the loop checkpoints and leaves at the next step."""

    def __init__(self):
        self.signum: Optional[int] = None

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self):
        for sig in CHECKPOINT_SIGNALS:
            signal.signal(sig, self)


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


def train(cfg: Config, data_dir, run_dir, *, progress: bool = True, max_steps: Optional[int] = None) -> dict:
    """Train (or resume) ``cfg`` on ``data_dir`` into ``run_dir``; returns the summary.

    ``max_steps`` stops early after that many steps *in this call* (for tests and for
    splitting a run); the schedule still spans ``train.steps``.
    """
    import tensorflow as tf
    from tqdm import tqdm

    from stemnet.data import make_dataset, plan_split
    from stemnet.distributed.backends import init_backend
    from stemnet.distributed.grouping import describe, make_groups
    from stemnet.models import build_model
    from stemnet.shards import read_manifest
    from stemnet.train.optim import EMA, build_optimizer
    from stemnet.train.schedule import WarmupDecay
    from stemnet.train.step import make_eval_step, make_train_step

    tcfg, dcfg, hcfg = cfg.train, cfg.data, cfg.distributed
    run, data_dir = Path(run_dir), Path(data_dir)

    # ---- processes: the backend says who we are
    backend = init_backend(hcfg)
    rank, world = backend.rank, backend.size
    setup_logging()

    # ---- data shapes, and the checks that must pass before any training
    manifest = read_manifest(data_dir)
    info = RunData.from_manifest(manifest, dcfg.targets).model_dump(mode="json")
    check_compatible(cfg, info, data_dir)
    per_epoch = plan_split(manifest, "train", rank=rank, world=world, batch_size=tcfg.batch_size,
                           where=str(data_dir)).batches_per_epoch
    lock = RunLock(run) if rank == 0 else None  # one trainer per run folder; made after the checks

    # ---- model, optimizer and counters, created where the backend keeps its variables
    tf.keras.utils.set_random_seed(tcfg.seed + rank)  # Python, NumPy and TF: Keras initialisers draw from all
    tf.keras.mixed_precision.set_global_policy(tcfg.precision)
    lr = WarmupDecay(tcfg.learning_rate * world, tcfg.steps, tcfg.warmup_steps, tcfg.schedule)
    with backend.scope():
        model = build_model(cfg.model, tuple(info["input_shape"]), tuple(info["output_shape"]))
        opt = build_optimizer(tcfg, lr)
        opt.build(model.trainable_variables)  # slots exist before the first step: restore/broadcast see them
        # counters: the same value on every replica (tf.distribute needs an aggregation to update them)
        one = tf.VariableAggregation.ONLY_FIRST_REPLICA
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step", aggregation=one)
        skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps", aggregation=one)
        ema = EMA(model.trainable_variables, tcfg.ema_decay) if tcfg.ema_decay else None
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, step=step, skipped=skipped,
                               **({"ema": ema} if ema is not None else {}))
    manager, candidates = checkpoints.open_manager(ckpt, run / runfiles.CHECKPOINTS, tcfg.keep_checkpoints)
    # a rank that must take part in reading the variables but does not write saves to scratch
    scratch = tempfile.TemporaryDirectory(prefix="stemnet-scratch-") if backend.collective_reads and rank else None
    if scratch is not None:
        manager = tf.train.CheckpointManager(ckpt, scratch.name, max_to_keep=1)

    # ---- resume from the newest checkpoint that reads; every rank then starts from rank 0's state
    restored = checkpoints.restore_newest(ckpt, candidates)  # a damaged newest one is skipped
    if restored:
        log.info("resumed %s at step %d", restored, int(step.numpy()))
    backend.broadcast(model.variables)
    backend.broadcast(opt.variables)
    start_step = saved_step = int(step.numpy())

    # ---- the input pipeline, at the exact data position (same epoch order, seen batches skipped)
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

    # ---- gradient groups and the step functions (stemnet.train.step)
    groups = make_groups(model, hcfg.grouping, group_bytes=int(hcfg.group_bytes_mib * 2**20),
                         first_group_bytes=int(hcfg.first_group_bytes_mib * 2**20))
    if world > 1:
        log.info("%s backend, %d ranks; gradient grouping %s: %s", backend.name, world, hcfg.grouping,
                 describe(groups))
    train_step = make_train_step(model, opt, lr, tcfg, step=step, skipped=skipped, backend=backend,
                                 groups=groups, ema=ema)
    eval_step = make_eval_step(model, tcfg, backend)

    # ---- logging, signals, termination
    writer = tf.summary.create_file_writer(str(run / runfiles.TENSORBOARD)) if rank == 0 else None
    stop = StopFlag()
    stop.install()
    end_step = tcfg.steps if max_steps is None else min(tcfg.steps, start_step + max_steps)
    bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", unit="step",
               disable=not progress or rank != 0, dynamic_ncols=True)
    samples = 0
    last_losses: Dict[str, float] = {}
    val_losses: Dict[str, float] = {}
    fp16 = tcfg.precision == "mixed_float16"
    record = BatchRecord(run, rank) if tcfg.record_batches else None
    iterator = iter(train_ds)
    t0 = time.perf_counter()
    while int(step.numpy()) < end_step:
        # forward backward update
        inputs, targets = next(iterator)
        if record is not None:
            record.write(int(step.numpy()) + 1, targets, lr(opt.iterations), opt.loss_scale if fp16 else None)
        losses = train_step(inputs, targets)
        current = int(step.numpy())

        # logging
        samples += int(inputs.shape[0]) * world
        last_losses = {k: float(v) for k, v in losses.items()}
        rate = samples / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{last_losses['total']:.4g}", sps=f"{rate:.1f}")
        if writer is not None:
            write_train_summaries(writer, current, last_losses, float(lr(current - 1)), rate,
                                  float(opt.loss_scale) if fp16 else None)

        # validation (every rank evaluates its share; the means are averaged over the ranks)
        if has_val and (current % tcfg.val_every == 0 or current == end_step):
            val_ds = make_dataset(data_dir, "val", rank=rank, world=world, batch_size=tcfg.batch_size,
                                  targets=dcfg.targets, shuffle=False, cbed_normalization=dcfg.cbed_normalization,
                                  verify_crc=dcfg.verify_crc, normalization=norm)
            val_losses = backend.mean(mean_losses(eval_step, val_ds))
            if writer is not None:
                write_val_summaries(writer, current, val_losses, inputs, targets, eval_step(inputs[:1], targets)[1])

        # checkpoint: periodic, and on SIGTERM/SIGUSR2 before leaving
        if current % tcfg.checkpoint_every == 0 or stop.signum is not None:
            saved_step = save_checkpoint(manager, current, saved_step, writes=rank == 0 or scratch is not None)
        if stop.signum is not None:
            bar.close()
            log.warning("signal %d: checkpoint written at step %d; rerun the same command to resume",
                        stop.signum, current)
            exit_now(128 + stop.signum, writer)
    bar.close()

    # ---- the end: last checkpoint, export, summary
    current = int(step.numpy())
    save_checkpoint(manager, current, saved_step, writes=rank == 0 or scratch is not None)
    elapsed = time.perf_counter() - t0
    summary = {
        "steps": current,
        "target_steps": tcfg.steps,
        "steps_this_call": current - start_step,
        "rank": rank,
        "world": world,
        "backend": backend.name,
        "global_batch": tcfg.batch_size * world,
        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "skipped_steps": int(skipped.numpy()),
        "precision": tcfg.precision,
        "train_loss": last_losses,
        "val_loss": val_losses,
        "finished": current >= tcfg.steps,
    }
    if summary["finished"] and (rank == 0 or scratch is not None):
        export_weights(Path(scratch.name) if scratch is not None else run, model, ema)
    if rank == 0:
        runfiles.write_json_atomic(run / runfiles.SUMMARY, summary)
        writer.flush()
        lock.release()
    backend.barrier()  # no rank leaves (and tears down its collectives) while another still writes
    if scratch is not None:
        scratch.cleanup()
    return summary


def save_checkpoint(manager, step: int, saved_step: int, *, writes: bool) -> int:
    """Save at ``step`` unless it is already saved; returns the last saved step."""
    if writes and step != saved_step:
        path = manager.save(checkpoint_number=step)
        log.debug("checkpoint %s", path)
    return step


def mean_losses(eval_step, dataset) -> Dict[str, float]:
    """Mean of each loss over the batches of ``dataset`` (this rank's share)."""
    sums: Dict[str, float] = {}
    count = 0
    for inputs, targets in dataset:
        losses, _ = eval_step(inputs, targets)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


def write_train_summaries(writer, step: int, losses: Dict[str, float], lr: float, rate: float,
                          loss_scale: Optional[float]) -> None:
    import tensorflow as tf

    with writer.as_default(step=step):
        for key, value in losses.items():
            tf.summary.scalar(f"train/loss_{key}", value)
        tf.summary.scalar("train/lr", lr)
        tf.summary.scalar("train/samples_per_s", rate)
        if loss_scale is not None:
            tf.summary.scalar("train/loss_scale", loss_scale)


def exit_now(code: int, writer) -> None:
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


def export_weights(run: Path, model, ema) -> None:
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


def write_val_summaries(writer, step: int, val_losses: Dict[str, float], inputs, targets, outputs) -> None:
    """Validation scalars, and one training sample's input, prediction and truth images."""
    import tensorflow as tf

    with writer.as_default(step=step):
        for key, value in val_losses.items():
            tf.summary.scalar(f"val/loss_{key}", value)
        tf.summary.image("inputs", _unit(inputs[:1, :, :, :1]))
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

