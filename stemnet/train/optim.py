"""Optimizers and gradient transforms: Adam / momentum SGD, LARC trust ratio, clipping."""

from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from stemnet.config import TrainConfig

LARS_ETA = 0.001  # trust coefficient (You et al. 2017)


def build_optimizer(cfg: TrainConfig, learning_rate) -> tf.keras.optimizers.Optimizer:
    """Adam or SGD with momentum; wrapped for dynamic loss scaling under mixed_float16."""
    if cfg.optimizer == "adam":
        opt = tf.keras.optimizers.Adam(learning_rate=learning_rate)
    else:
        opt = tf.keras.optimizers.SGD(learning_rate=learning_rate, momentum=cfg.momentum)
    if cfg.precision == "mixed_float16":
        opt = tf.keras.mixed_precision.LossScaleOptimizer(opt, dynamic=True)
    return opt


def larc(grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable], lr, eta: float = LARS_ETA) -> List[tf.Tensor]:
    """LARC (clip mode): per layer, scale g by min(η‖w‖ / (‖g‖ lr), 1).

    Vectors (biases, normalisation parameters) are left alone, as usual for LARS.
    """
    lr = tf.cast(lr, tf.float32)
    out = []
    for g, v in zip(grads, variables):
        if g is None or len(v.shape) <= 1:
            out.append(g)
            continue
        w_norm = tf.norm(tf.cast(v, tf.float32))
        g_norm = tf.norm(tf.cast(g, tf.float32))
        trust = eta * w_norm / (g_norm * lr + 1e-12)
        scale = tf.where((w_norm > 0) & (g_norm > 0), tf.minimum(trust, 1.0), 1.0)
        out.append(g * tf.cast(scale, g.dtype))
    return out


def transform_gradients(grads, variables, cfg: TrainConfig, lr) -> List[tf.Tensor]:
    """Apply the configured LARC and global-norm clipping (in that order)."""
    grads = list(grads)
    if cfg.lars:
        grads = larc(grads, variables, lr)
    if cfg.clip_norm:
        grads, _ = tf.clip_by_global_norm(grads, cfg.clip_norm)
    return grads


def all_finite(grads: Sequence[tf.Tensor]) -> tf.Tensor:
    """True when every gradient entry is finite (a skipped step otherwise)."""
    checks = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


class EMA(tf.Module):
    """Exponential moving average of the trainable weights, checkpointed with the run.

    ``shadow = decay · shadow + (1 − decay) · w`` after every applied step; the export
    writes the shadow weights. (``tf.train.ExponentialMovingAverage`` is not trackable by
    ``tf.train.Checkpoint``, so resuming would lose it.)
    """

    def __init__(self, variables: Sequence[tf.Variable], decay: float):
        super().__init__(name="ema")
        self.decay = float(decay)
        self.shadow = [tf.Variable(v, trainable=False, name=f"ema_{i}",
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                       for i, v in enumerate(variables)]

    def apply(self, variables: Sequence[tf.Variable]) -> None:
        for shadow, v in zip(self.shadow, variables):
            shadow.assign(self.decay * shadow + (1.0 - self.decay) * tf.cast(v, shadow.dtype))
