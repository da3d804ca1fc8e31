"""Learning rate: linear warm-up to the (world-scaled) peak, then cosine or step decay."""

from __future__ import annotations

import math

import tensorflow as tf

STEP_DECAY_AT = (0.5, 0.75)  # fractions of the run where the step schedule divides by 10


class WarmupDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): 0 → ``peak`` linearly over ``warmup_steps``, then ``schedule`` to the end.

    ``peak`` is the base rate times the world size (linear scaling rule); ``schedule`` is
    'constant', 'cosine' (to 0 at ``total_steps``) or 'step' (÷10 at 50 % and 75 %).
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine"):
        super().__init__()
        if schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"train.schedule: expected constant, cosine or step, got {schedule!r}")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.cast(max(self.warmup_steps, 1), tf.float32)
        warmup = self.peak * tf.minimum((step + 1.0) / warm, 1.0)
        decay_len = tf.cast(max(self.total_steps - self.warmup_steps, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_len, 0.0, 1.0)
        if self.schedule == "cosine":
            after = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.schedule == "step":
            factor = tf.add_n([tf.cast(progress >= f, tf.float32) for f in STEP_DECAY_AT])
            after = self.peak * tf.pow(0.1, factor)
        else:
            after = tf.constant(self.peak)
        return tf.where(step < self.warmup_steps, warmup, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "schedule": self.schedule}
