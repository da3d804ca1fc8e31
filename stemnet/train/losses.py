"""Per-head losses, computed in float32, with masks and per-sample weights."""

from __future__ import annotations

from typing import Dict, Optional

import tensorflow as tf

HUBER_DELTA = 1.0


def elementwise(kind: str, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """The pointwise error of ``kind`` ('l1', 'mse', 'huber'), float32."""
    err = tf.cast(y_pred, tf.float32) - tf.cast(y_true, tf.float32)
    if kind == "l1":
        return tf.abs(err)
    if kind == "mse":
        return tf.square(err)
    if kind == "huber":
        abs_err = tf.abs(err)
        quad = tf.minimum(abs_err, HUBER_DELTA)
        return 0.5 * tf.square(quad) + HUBER_DELTA * (abs_err - quad)
    raise ValueError(f"train.loss: expected one of l1, mse, huber, got {kind!r}")


def head_loss(kind: str, y_true, y_pred, *, mask=None, weight=None, weight_total=None) -> tf.Tensor:
    """Mean error over pixels (weighted by ``mask`` if given) and samples (by ``weight``).

    ``mask`` has the shape of ``y_true`` (e.g. column weights for displacement maps);
    ``weight`` is (B,) with 0 for padding samples. ``weight_total`` divides the weighted
    sum instead of this batch's weight sum: the global batch's, so that the per-rank
    values add up to the mean over every real sample of the step. Returns a float32 scalar.
    """
    err = elementwise(kind, y_true, y_pred)
    axes = list(range(1, len(err.shape)))
    if mask is None:
        per_sample = tf.reduce_mean(err, axis=axes)
    else:
        mask = tf.cast(mask, tf.float32)
        per_sample = tf.reduce_sum(err * mask, axis=axes) / tf.maximum(tf.reduce_sum(mask, axis=axes), 1e-6)
    if weight is None:
        return tf.reduce_mean(per_sample)
    weight = tf.cast(weight, tf.float32)
    total = tf.reduce_sum(weight) if weight_total is None else tf.cast(weight_total, tf.float32)
    return tf.reduce_sum(per_sample * weight) / tf.maximum(total, 1e-6)


def total_loss(kind: str, targets: Dict[str, tf.Tensor], outputs: Dict[str, tf.Tensor],
               head_weights: Dict[str, float], weight_total=None) -> Dict[str, tf.Tensor]:
    """Loss per head present in both ``outputs`` and ``targets``, and their weighted sum.

    ``weight_total``: see :func:`head_loss` (the global batch's weight sum).
    """
    weight: Optional[tf.Tensor] = targets.get("weight")
    losses = {}
    for head, prediction in outputs.items():
        if head not in targets:
            continue
        mask = targets.get(f"{head}_mask")
        losses[head] = head_loss(kind, targets[head], prediction, mask=mask, weight=weight,
                                 weight_total=weight_total)
    losses["total"] = tf.add_n([head_weights.get(h, 1.0) * v for h, v in losses.items()])
    return losses
