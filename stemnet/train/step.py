"""One optimisation step as a ``tf.function``: the heart of the training loop.

forward → float32 loss → (scaled) gradients, reduced over the ranks by the backend in the
configured groups → unscaled → non-finite check (after the reduction, so every rank skips
the same steps) → LARC / clipping → apply (+ EMA).

On several ranks (op average) the loss is the mean over the real samples of the *global*
batch: each rank divides its weighted sum by the summed weight of all ranks, and the
backend's average is undone by the factor world size. So padding (weight 0) changes
nothing, and a rank whose batch is all padding contributes nothing instead of halving
the step.

The forward/backward half runs in the backend's replica context (``backend.run``); the
decision to apply is taken outside it, so that the optimizer's own synchronisation under
tf.distribute never sits inside a ``tf.cond``.
"""

from __future__ import annotations

import tensorflow as tf

from stemnet.config import TrainConfig
from stemnet.train.losses import total_loss
from stemnet.train.optim import all_finite, transform_gradients


def make_train_step(model, opt, lr, tcfg: TrainConfig, *, step: tf.Variable, skipped: tf.Variable, backend=None,
                    groups=None, ema=None):
    """``train_step(inputs, targets) -> losses`` for ``model``; counts in ``step``/``skipped``.

    ``backend`` (:mod:`stemnet.distributed.backends`; default: one process) reduces the
    gradients in ``groups``; on one rank it returns them as they are.
    """
    if backend is None:
        from stemnet.distributed.backends import LocalBackend

        backend = LocalBackend()
    variables = model.trainable_variables
    fp16 = tcfg.precision == "mixed_float16"
    global_mean = backend.size > 1 and backend.averages  # Adasum combines gradients itself: per-rank means
    world = float(backend.size)

    def forward_backward(inputs, targets):
        weight_total = None
        if global_mean and "weight" in targets:
            weight_total = backend.all_sum(tf.reduce_sum(tf.cast(targets["weight"], tf.float32)),
                                           "global_weight_sum")
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            losses = total_loss(tcfg.loss, targets, outputs, tcfg.head_weights, weight_total=weight_total)
            share = losses["total"] if weight_total is None else losses["total"] * world  # undo the average
            objective = opt.get_scaled_loss(share) if fp16 else share
        grads = backend.gradients(tape, objective, variables, groups)
        if fp16:
            grads = opt.get_unscaled_gradients(grads)
        finite = all_finite(grads)
        grads = transform_gradients(grads, variables, tcfg, lr(opt.iterations))
        if weight_total is not None:  # the shares add up to the global mean
            losses = {k: backend.all_sum(v, f"global_loss_{k}") for k, v in losses.items()}
        return losses, grads, finite

    def apply(grads):
        opt.apply_gradients(zip(grads, variables), **backend.apply_options)
        if ema is not None:
            ema.apply(variables)
        return tf.constant(0, tf.int64)

    @tf.function
    def train_step(inputs, targets):
        losses, grads, finite = backend.run(forward_backward, inputs, targets)
        if fp16:  # the LossScaleOptimizer skips non-finite steps and lowers the scale itself
            backend.run(apply, grads)
            skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        else:
            skipped.assign_add(tf.cond(finite, lambda: backend.run(apply, grads), lambda: tf.constant(1, tf.int64)))
        step.assign_add(1)
        return losses

    return train_step


def make_eval_step(model, tcfg: TrainConfig, backend):
    """``eval_step(inputs, targets) -> (losses, outputs)`` in the backend's replica context."""

    def forward(inputs, targets):
        outputs = model(inputs, training=False)
        return total_loss(tcfg.loss, targets, outputs, tcfg.head_weights), outputs

    @tf.function
    def eval_step(inputs, targets):
        return backend.run(forward, inputs, targets)

    return eval_step
