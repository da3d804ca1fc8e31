"""One optimisation step as a ``tf.function``: the heart of the training loop.

forward → float32 loss → (scaled) gradients, reduced over the ranks by the backend in the
configured groups → unscaled → non-finite check (after the reduction, so every rank skips
the same steps) → LARC / clipping → apply (+ EMA).

The forward/backward half runs in the backend's replica context (``backend.run``); the
decision to apply is taken outside it, so that the optimizer's own synchronisation under
tf.distribute never sits inside a ``tf.cond``.
"""

from __future__ import annotations

import tensorflow as tf

from stemnet.config import TrainConfig
from stemnet.train.losses import total_loss
from stemnet.train.optim import all_finite, transform_gradients


def make_train_step(model, opt, lr, tcfg: TrainConfig, *, step: tf.Variable, skipped: tf.Variable, backend,
                    groups=None, ema=None):
    """``train_step(inputs, targets) -> losses`` for ``model``; counts in ``step``/``skipped``.

    ``backend`` (:mod:`stemnet.distributed.backends`) reduces the gradients in ``groups``;
    on one rank it returns them as they are.
    """
    variables = model.trainable_variables
    fp16 = tcfg.precision == "mixed_float16"

    def forward_backward(inputs, targets):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            losses = total_loss(tcfg.loss, targets, outputs, tcfg.head_weights)
            objective = opt.get_scaled_loss(losses["total"]) if fp16 else losses["total"]
        grads = backend.gradients(tape, objective, variables, groups)
        if fp16:
            grads = opt.get_unscaled_gradients(grads)
        finite = all_finite(grads)
        grads = transform_gradients(grads, variables, tcfg, lr(opt.iterations))
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
