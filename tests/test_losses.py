"""Losses and the learning-rate schedule against values worked out by hand."""

import math

import numpy as np
import pytest


def test_head_loss_masks_pixels_and_weights_samples():
    import tensorflow as tf

    from stemnet.train.losses import head_loss

    truth = np.zeros((2, 1, 2, 1), np.float32)
    pred = np.array([[[[1.0], [3.0]]], [[[2.0], [2.0]]]], np.float32)  # squared errors 1, 9 | 4, 4
    mask = np.array([[[[1.0], [0.0]]], [[[0.5], [0.5]]]], np.float32)
    weight = np.array([1.0, 0.0], np.float32)
    # sample 0: masked mean 1; sample 1: 4. Weighted by (1, 0): 1.
    assert float(head_loss("mse", truth, pred, mask=mask)) == pytest.approx((1 + 4) / 2)
    assert float(head_loss("mse", truth, pred, mask=mask, weight=weight)) == pytest.approx(1.0)
    # unmasked: sample means 5 and 4
    assert float(head_loss("mse", truth, pred)) == pytest.approx(4.5)
    # divided by a global weight sum (2 real samples over all ranks): half of this rank's sum
    assert float(head_loss("mse", truth, pred, mask=mask, weight=weight, weight_total=tf.constant(2.0))) == \
        pytest.approx(0.5)
    assert float(head_loss("l1", truth, pred)) == pytest.approx((2 + 2) / 2)
    # huber (delta 1): |e| = 1 -> 0.5; 3 -> 2.5; 2 -> 1.5
    assert float(head_loss("huber", truth, pred)) == pytest.approx(((0.5 + 2.5) / 2 + 1.5) / 2)


def test_warmup_cosine_and_step_schedules():
    from stemnet.train.schedule import WarmupDecay

    lr = WarmupDecay(0.01, total_steps=10, warmup_steps=2, schedule="cosine")
    values = [float(lr(s)) for s in range(11)]
    expected = [0.005, 0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-9)
    step = WarmupDecay(1.0, total_steps=8, schedule="step")
    np.testing.assert_allclose([float(step(s)) for s in range(8)], [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
