"""Building blocks of the FC-DenseNet: CoordConv channels, dense layers and blocks,
transitions down and up.

Every function takes a Keras tensor and returns one (functional API, channels-last) and
names its layers after a stable ``prefix`` so that the variable names, and so Horovod's
tensor names, are the same on every rank and every run. Nothing here looks layers up by
name: the graph is read through :func:`stemnet.models.summary.layer_graph`.
"""

from __future__ import annotations

from typing import List, Tuple

import tensorflow as tf

KERNEL_INIT = "he_uniform"


class CoordChannels(tf.keras.layers.Layer):
    """Append two channels holding the normalised x and y pixel coordinates (CoordConv).

    The coordinates run linearly from -1 (first column / row) to +1 (last), in the
    layer's compute dtype, broadcast over the batch: ``(B, H, W, C) -> (B, H, W, C + 2)``
    with channel ``C`` = x (column) and ``C + 1`` = y (row). No trainable variables.
    """

    def call(self, inputs):
        shape = tf.shape(inputs)
        batch, height, width = shape[0], shape[1], shape[2]
        xs = tf.linspace(-1.0, 1.0, width)
        ys = tf.linspace(-1.0, 1.0, height)
        grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
        coords = tf.stack([grid_x, grid_y], axis=-1)
        coords = tf.cast(coords, inputs.dtype)[tf.newaxis]
        coords = tf.tile(coords, tf.stack([batch, 1, 1, 1]))
        return tf.concat([inputs, coords], axis=-1)

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        return tf.TensorShape(shape[:-1] + [None if shape[-1] is None else shape[-1] + 2])


def _bn_relu(x, batch_norm: bool, prefix: str):
    """[BatchNormalization] -> ReLU."""
    if batch_norm:
        x = tf.keras.layers.BatchNormalization(name=f"{prefix}_bn")(x)
    return tf.keras.layers.ReLU(name=f"{prefix}_relu")(x)


def dense_layer(x, filters: int, kernel_size: int, *, batch_norm: bool, dropout: float, prefix: str):
    """One dense-block layer: [BN] -> ReLU -> conv k×k (``filters`` maps) -> [dropout]."""
    x = _bn_relu(x, batch_norm, prefix)
    x = tf.keras.layers.Conv2D(filters, kernel_size, padding="same", kernel_initializer=KERNEL_INIT,
                               name=f"{prefix}_conv")(x)
    if dropout > 0:
        x = tf.keras.layers.Dropout(dropout, name=f"{prefix}_drop")(x)
    return x


def dense_block(x, n_layers: int, growth: int, kernel_size: int, *, batch_norm: bool,
                dropout: float, prefix: str) -> Tuple[tf.Tensor, tf.Tensor]:
    """A dense block of ``n_layers`` layers of ``growth`` maps each.

    Each layer sees the concatenation of the block input and every earlier layer's maps.

    Returns
    -------
    stack : the block input concatenated with all new maps (``C + n_layers * growth``).
    new : the new maps only (``n_layers * growth`` channels), what the up path upsamples.
    """
    new: List[tf.Tensor] = []
    stack = x
    for i in range(n_layers):
        out = dense_layer(stack, growth, kernel_size, batch_norm=batch_norm, dropout=dropout,
                          prefix=f"{prefix}_layer{i}")
        new.append(out)
        stack = tf.keras.layers.Concatenate(name=f"{prefix}_cat{i}")([stack, out])
    fresh = new[0] if len(new) == 1 else tf.keras.layers.Concatenate(name=f"{prefix}_new")(new)
    return stack, fresh


def transition_down(x, *, pooling: str, batch_norm: bool, dropout: float, prefix: str):
    """[BN] -> ReLU -> 1×1 conv (same channel count) -> [dropout] -> 2×2 pooling, stride 2."""
    filters = int(x.shape[-1])
    x = dense_layer(x, filters, 1, batch_norm=batch_norm, dropout=dropout, prefix=prefix)
    pool = tf.keras.layers.MaxPooling2D if pooling == "max" else tf.keras.layers.AveragePooling2D
    return pool(pool_size=2, strides=2, name=f"{prefix}_pool")(x)


def transition_up(x, skip, kernel_size: int, *, prefix: str):
    """Transposed conv k×k, stride 2 (keeping the channel count), then concat with ``skip``."""
    filters = int(x.shape[-1])
    x = tf.keras.layers.Conv2DTranspose(filters, kernel_size, strides=2, padding="same",
                                        kernel_initializer=KERNEL_INIT, name=f"{prefix}_convt")(x)
    return tf.keras.layers.Concatenate(name=f"{prefix}_cat")([x, skip])
