"""FC-DenseNet ("Tiramisu", Jégou et al. 2017) encoder-decoder for measurement -> maps.

Architecture (``L = len(cfg.layers_per_block)`` levels, ``n_i = layers_per_block[i]``)::

    input (H, W, C) -> [zero-pad to a multiple of 2**L] -> [CoordConv] -> conv k×k
    down i = 0..L-1:  dense block (n_i layers) -> skip_i -> transition down
    bottleneck:       dense block (bottleneck_layers), only its new maps go up
    up i = L-1..0:    transition up (new maps of the block below) ++ skip_i
                      -> [CoordConv] -> dense block (n_i layers)
    last up block's full stack -> [crop the padding] -> [bilinear resize to (H', W')]
    -> one 1×1 conv per head (float32)

The up path mirrors ``layers_per_block``; as in the paper, an up block passes only its
new maps to the next transition up, and the last one passes its whole stack to the heads.

Input and output sizes may differ (a K×K CBED stack -> an H'×W' real-space map): the
decoder works at the input resolution (the skip connections need it) and one bilinear
``Resizing`` layer, shared by all heads, brings its final feature stack to (H', W') just
before the heads. Since a 1×1 conv and bilinear interpolation are both linear per pixel
(the interpolation weights sum to one), this equals resizing each head's output, so the
choice costs nothing in expressiveness; it does not add learned upsampling.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import tensorflow as tf

from stemnet.config import ModelConfig
from stemnet.errors import UserError
from stemnet.models.layers import CoordChannels, dense_block, transition_down, transition_up


class ModelShapeError(UserError, ValueError):
    """An input or output shape the model cannot be built for (one line)."""


def _check_shape(value, length: int, what: str) -> Tuple[int, ...]:
    """``value`` as a tuple of ``length`` positive ints, or a one-line error."""
    try:
        shape = tuple(int(v) for v in value)
        ok = len(shape) == length and all(v > 0 and v == w for v, w in zip(shape, value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        axes = "(H, W, C)" if length == 3 else "(H, W)"
        raise ModelShapeError(f"{what} {value!r}: expected {length} positive integers {axes}")
    return shape


def check_shapes(cfg: ModelConfig, input_shape: Sequence[int],
                 output_shape: Optional[Sequence[int]]) -> Tuple[Tuple[int, int, int], Tuple[int, int]]:
    """Validate the shapes a model is built for; ``output_shape=None`` means the input's H, W.

    Raises
    ------
    ModelShapeError (a ValueError) naming the shape and what was expected; also when the
    input is smaller than the pooling divisor ``2**len(layers_per_block)``.
    """
    shape_in = _check_shape(input_shape, 3, "input_shape")
    shape_out = shape_in[:2] if output_shape is None else _check_shape(output_shape, 2, "output_shape")
    divisor = 2 ** len(cfg.layers_per_block)
    if min(shape_in[:2]) < divisor:
        raise ModelShapeError(
            f"input_shape {shape_in}: H and W must be at least {divisor} "
            f"(2**{len(cfg.layers_per_block)} for layers_per_block {cfg.layers_per_block})"
        )
    return shape_in, shape_out


def padding_for(size: int, divisor: int) -> Tuple[int, int]:
    """(before, after) zeros that make ``size`` a multiple of ``divisor`` (extra one after)."""
    total = -size % divisor
    return total // 2, total - total // 2


def _encoder(x, cfg: ModelConfig):
    """Initial conv and the down path; returns (bottleneck input, skips top-down)."""
    opts = dict(batch_norm=cfg.batch_norm, dropout=cfg.dropout)
    x = tf.keras.layers.Conv2D(cfg.initial_filters, cfg.kernel_size, padding="same",
                               kernel_initializer="he_uniform", name="init_conv")(x)
    skips = []
    for i, n_layers in enumerate(cfg.layers_per_block):
        x, _ = dense_block(x, n_layers, cfg.growth, cfg.kernel_size, prefix=f"down{i}", **opts)
        skips.append(x)
        x = transition_down(x, pooling=cfg.pooling, prefix=f"td{i}", **opts)
    return x, skips


def _decoder(x, skips, cfg: ModelConfig):
    """Bottleneck and the up path; returns the last up block's full stack."""
    opts = dict(batch_norm=cfg.batch_norm, dropout=cfg.dropout)
    _, new = dense_block(x, cfg.bottleneck_layers, cfg.growth, cfg.kernel_size,
                         prefix="bottleneck", **opts)
    stack = new
    for i in reversed(range(len(cfg.layers_per_block))):
        x = transition_up(new, skips[i], cfg.kernel_size, prefix=f"tu{i}")
        if cfg.coordconv:
            x = CoordChannels(name=f"up{i}_coords")(x)
        stack, new = dense_block(x, cfg.layers_per_block[i], cfg.growth, cfg.kernel_size,
                                 prefix=f"up{i}", **opts)
    return stack


def build_model(cfg: ModelConfig, input_shape: Sequence[int],
                output_shape: Optional[Sequence[int]] = None) -> tf.keras.Model:
    """Build the FC-DenseNet described by ``cfg`` (see the module docstring).

    Parameters
    ----------
    cfg : the ``model`` config section.
    input_shape : (H, W, C), channels-last, one sample.
    output_shape : (H', W') of the target maps; ``None`` for the input's (H, W).

    Returns
    -------
    A functional ``tf.keras.Model`` named ``fcdensenet`` whose output is a dict
    ``{head: (B, H', W', channels)}``, float32 whatever the mixed-precision policy. Layers
    follow the global ``tf.keras.mixed_precision`` policy, except the heads (float32).
    H and W need not be multiples of ``2**levels``: the input is zero-padded and the
    padding cropped before the heads.
    """
    shape_in, shape_out = check_shapes(cfg, input_shape, output_shape)
    divisor = 2 ** len(cfg.layers_per_block)
    pads = (padding_for(shape_in[0], divisor), padding_for(shape_in[1], divisor))
    inputs = tf.keras.Input(shape=shape_in, name="measurement")
    x = inputs
    if any(sum(p) for p in pads):
        x = tf.keras.layers.ZeroPadding2D(pads, name="pad")(x)
    if cfg.coordconv:
        x = CoordChannels(name="input_coords")(x)
    x, skips = _encoder(x, cfg)
    x = _decoder(x, skips, cfg)
    if any(sum(p) for p in pads):
        x = tf.keras.layers.Cropping2D(pads, name="crop")(x)
    if shape_out != shape_in[:2]:
        x = tf.keras.layers.Resizing(*shape_out, interpolation="bilinear", name="resize")(x)
    outputs = {
        head: tf.keras.layers.Conv2D(channels, 1, dtype="float32", name=f"head_{head}")(x)
        for head, channels in cfg.heads.items()
    }
    return tf.keras.Model(inputs, outputs, name="fcdensenet")
