"""One optimisation step as a ``tf.function``: the heart of the training loop.

forward → float32 loss → (scaled) gradients, allreduced by Horovod in the configured
groups → unscaled → non-finite check (after the allreduce, so every rank skips the same
steps) → LARC / clipping → apply (+ EMA).

On several ranks (op average) the loss is the mean over the real samples of the *global*
batch: each rank divides its weighted sum by the allreduced weight sum, and Horovod's
average is undone by the factor world size. So padding (weight 0) changes nothing, and a
rank whose batch is all padding contributes nothing instead of halving the step.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from stemnet.config import DistributedConfig, TrainConfig
from stemnet.train.losses import total_loss
from stemnet.train.optim import all_finite, transform_gradients


def make_train_step(
    model,
    opt,
    lr,
    tcfg: TrainConfig,
    *,
    step: tf.Variable,
    skipped: tf.Variable,
    hvd=None,
    hcfg: Optional[DistributedConfig] = None,
    groups=None,
    ema=None,
):
    """``train_step(inputs, targets) -> losses`` for ``model``; counts in ``step``/``skipped``.

    With ``hvd`` initialised on more than one rank the gradient tape is Horovod's
    ``DistributedGradientTape`` with ``groups`` and the ``hcfg`` options (compression,
    op, pre-division); on one rank it is the plain tape.
    """
    variables = model.trainable_variables
    fp16 = tcfg.precision == "mixed_float16"
    distributed = hvd is not None and hvd.size() > 1
    global_mean = False
    if distributed:
        hcfg = hcfg or DistributedConfig()
        tape_options = dict(
            compression=hvd.Compression.fp16 if hcfg.compression == "fp16" else hvd.Compression.none,
            op=hvd.Adasum if hcfg.op == "adasum" else hvd.Average,
            groups=groups,
            gradient_predivide_factor=hcfg.gradient_predivide_factor,
        )
        global_mean = hcfg.op == "average"  # Adasum combines gradients itself: per-rank means
        world = float(hvd.size())

    @tf.function
    def train_step(inputs, targets):
        weight_total = None
        if global_mean and "weight" in targets:
            weight_total = hvd.allreduce(tf.reduce_sum(tf.cast(targets["weight"], tf.float32)), op=hvd.Sum,
                                         name="global_weight_sum")
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            losses = total_loss(tcfg.loss, targets, outputs, tcfg.head_weights, weight_total=weight_total)
            share = losses["total"] if weight_total is None else losses["total"] * world  # undo the average
            objective = opt.get_scaled_loss(share) if fp16 else share
        if distributed:
            tape = hvd.DistributedGradientTape(tape, **tape_options)
        grads = tape.gradient(objective, variables)
        if fp16:
            grads = opt.get_unscaled_gradients(grads)
        finite = all_finite(grads)
        grads = transform_gradients(grads, variables, tcfg, lr(opt.iterations))

        def apply():
            opt.apply_gradients(zip(grads, variables))
            if ema is not None:
                ema.apply(variables)
            return tf.constant(0, tf.int64)

        if fp16:  # the LossScaleOptimizer skips non-finite steps and lowers the scale itself
            apply()
            skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        else:
            skipped.assign_add(tf.cond(finite, apply, lambda: tf.constant(1, tf.int64)))
        step.assign_add(1)
        if weight_total is not None:  # the shares add up to the global mean
            losses = {k: hvd.allreduce(v, op=hvd.Sum, name=f"global_loss_{k}") for k, v in losses.items()}
        return losses

    return train_step
