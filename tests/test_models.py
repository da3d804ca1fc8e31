"""FC-DenseNet: shapes and dtypes, parameter and FLOP counts, the layer graph, the order
backprop produces gradients (recorded from a real backward pass), training, bad shapes."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from stemnet.config import ModelConfig, load_config
from stemnet.models import (
    CoordChannels,
    ModelShapeError,
    backprop_order,
    build_model,
    format_summary,
    layer_graph,
    model_summary,
    summarize,
    totals,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(initial_filters=4, growth=2, layers_per_block=[1, 1], bottleneck_layers=1)


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


@pytest.fixture
def mixed_bfloat16():
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def batch(shape, n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# ------------------------------------------------------------------- shapes, dtypes
VARIANTS = {
    "default": {},
    "no_batch_norm": dict(batch_norm=False),
    "coordconv": dict(coordconv=True),
    "dropout": dict(dropout=0.2),
    "avg_pool": dict(pooling="avg"),
    "all_options": dict(batch_norm=False, coordconv=True, dropout=0.1, pooling="avg", kernel_size=5),
}
SHAPES = {
    "same": ((16, 16, 3), None, (16, 16)),
    "different": ((16, 16, 5), (24, 20), (24, 20)),
    "odd_same": ((9, 7, 3), None, (9, 7)),
    "odd_different": ((9, 7, 3), (12, 10), (12, 10)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shapes", sorted(SHAPES))
def test_output_shapes_and_dtypes(variant, shapes):
    input_shape, output_shape, expected = SHAPES[shapes]
    model = build_model(tiny(**VARIANTS[variant]), input_shape, output_shape)
    out = model(batch(input_shape), training=True)
    assert sorted(out) == ["displacement", "potential"]
    for head, channels in {"potential": 1, "displacement": 9}.items():
        assert tuple(out[head].shape) == (2, *expected, channels)
        assert out[head].dtype == tf.float32
        assert np.isfinite(out[head].numpy()).all()
        assert model.output_shape[head] == (None, *expected, channels)


def test_single_head_and_channel_count():
    model = build_model(tiny(heads={"displacement": 9}), (8, 8, 16))
    out = model(batch((8, 8, 16)))
    assert list(out) == ["displacement"]
    assert tuple(out["displacement"].shape) == (2, 8, 8, 9)


def test_mixed_bfloat16_gives_float32_outputs(mixed_bfloat16):
    model = build_model(tiny(coordconv=True), (12, 12, 4), (16, 16))
    out = model(batch((12, 12, 4)), training=True)
    assert {k: v.dtype for k, v in out.items()} == {"potential": tf.float32, "displacement": tf.float32}
    compute = {node.name: node.layer.compute_dtype for node in layer_graph(model)}
    assert compute["init_conv"] == "bfloat16" and compute["resize"] == "bfloat16"
    assert compute["head_potential"] == "float32"
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)


def test_coord_channels_values():
    out = CoordChannels()(np.zeros((1, 3, 5, 2), np.float32)).numpy()
    assert out.shape == (1, 3, 5, 4)
    np.testing.assert_allclose(out[0, 0, :, 2], [-1, -0.5, 0, 0.5, 1])  # x along a row
    np.testing.assert_allclose(out[0, :, 0, 3], [-1, 0, 1])  # y down a column
    np.testing.assert_array_equal(out[..., :2], 0)


def test_resize_equals_resizing_each_head():
    """Bilinear resize before a 1×1 head == resize of the head's output (the design claim)."""
    model = build_model(tiny(), (8, 8, 3), (13, 11))
    x = batch((8, 8, 3))
    graph = {node.name: node.layer for node in layer_graph(model)}
    features = tf.keras.Model(model.input, graph["resize"].input)(x)
    head = graph["head_potential"]
    late = tf.image.resize(head(features), (13, 11), method="bilinear")
    np.testing.assert_allclose(model(x)["potential"].numpy(), late.numpy(), atol=1e-5)


# ------------------------------------------------------------- parameters, FLOPs
def test_parameter_count_by_hand():
    # in 2 ch -> init 3x3 conv 4 | down: BN(4), 3x3 4->2, cat=6 | TD: BN(6), 1x1 6->6, pool
    # bottleneck: BN(6), 3x3 6->2 | TU: 3x3 transpose 2->2, cat skip -> 8
    # up: BN(8), 3x3 8->2, cat=10 | head 1x1 10->1
    cfg = tiny(layers_per_block=[1], heads={"potential": 1})
    model = build_model(cfg, (8, 8, 2))
    by_hand = {
        "init_conv": 9 * 2 * 4 + 4, "down0_layer0_bn": 2 * 4, "down0_layer0_conv": 9 * 4 * 2 + 2,
        "td0_bn": 2 * 6, "td0_conv": 6 * 6 + 6, "bottleneck_layer0_bn": 2 * 6,
        "bottleneck_layer0_conv": 9 * 6 * 2 + 2, "tu0_convt": 9 * 2 * 2 + 2,
        "up0_layer0_bn": 2 * 8, "up0_layer0_conv": 9 * 8 * 2 + 2, "head_potential": 10 * 1 + 1,
    }
    assert sum(by_hand.values()) == 545
    rows = model_summary(cfg, (8, 8, 2))
    assert {r["name"]: r["params"] for r in rows} == by_hand
    assert totals(rows)["params"] == 545
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 545
    assert model.count_params() == 545 + 2 * (4 + 6 + 6 + 8)  # + BN moving mean, variance


def test_summary_rows_and_flops():
    cfg = tiny(coordconv=True)
    rows = model_summary(cfg, (16, 16, 3), (20, 20))
    model = build_model(cfg, (16, 16, 3), (20, 20))
    assert [r["name"] for r in rows] == [n.name for n in backprop_order(model)]
    assert totals(rows)["params"] == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    row = {r["name"]: r for r in rows}
    # init conv sees 3 + 2 coordinate channels: 2·16·16·3²·5·4 + bias 16·16·4
    assert row["init_conv"]["flops_fwd"] == 2 * 16 * 16 * 9 * 5 * 4 + 16 * 16 * 4
    assert row["init_conv"]["flops_bwd"] == 2 * row["init_conv"]["flops_fwd"]
    assert row["init_conv"]["grad_bytes"] == 4 * (9 * 5 * 4 + 4)
    # transposed conv: each of the 4·4 input pixels of 2 maps scatters 3²·2 values
    assert row["tu1_convt"]["flops_fwd"] == 2 * 4 * 4 * 9 * 2 * 2 + 8 * 8 * 2
    assert row["head_displacement"]["output_shape"] == (20, 20, 9)
    assert row["down0_layer0_bn"]["flops_fwd"] == 8 * 16 * 16 * 4
    text = format_summary(rows).splitlines()
    assert len(text) == len(rows) + 4
    assert text[-1].split()[:2] == ["total", str(len(rows))]
    assert f"{totals(rows)['params']:,}" in text[-1]


# ------------------------------------------------------------------- layer graph
def test_layer_graph_is_topological_and_covers_variables():
    model = build_model(tiny(coordconv=True, dropout=0.1, layers_per_block=[2, 1]), (12, 10, 3), (8, 8))
    graph = layer_graph(model)
    position = {id(n.layer): n.index for n in graph}
    assert [n.index for n in graph] == list(range(len(graph)))
    assert len(graph) == len(model.layers)
    assert sum(len(n.inbound) for n in graph) > len(graph)  # concatenations have two inputs
    for node in graph:
        assert all(position[id(parent)] < node.index for parent in node.inbound)
    refs = [v.ref() for n in graph for v in n.variables]
    assert len(refs) == len(set(refs))
    assert set(refs) == {v.ref() for v in model.trainable_variables}
    skip = {n.name: n for n in graph}["tu1_cat"]
    assert sorted(p.name for p in skip.inbound) == ["down1_cat0", "tu1_convt"]


def _tap(x, layer, events):
    """Identity whose gradient function records ``layer`` when the gradient arrives."""

    @tf.custom_gradient
    def identity(t):
        def grad(dy):
            events.append(layer)
            return dy

        return tf.identity(t), grad

    return identity(x)


def recorded_gradient_order(model, x):
    """Layers with variables, in the order a real eager backward pass finishes them.

    Each such layer's input goes through its own recording identity. The tape runs an
    op's gradient only once every consumer of its output has run its own, so the identity
    in front of layer L fires right after L's backward ops (which produce L's variable
    gradients) and never before: the list is the gradient-ready order of the layers.
    """
    events = []
    for node in layer_graph(model):
        if node.variables:
            call = node.layer.call
            node.layer.call = (lambda inputs, *a, _call=call, _layer=node.layer, **k:
                               _call(_tap(inputs, _layer, events), *a, **k))
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)  # so the first layer's input identity is on the tape too
        out = model(x, training=True)
        loss = tf.add_n([tf.reduce_mean(tf.square(v)) for v in out.values()])
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    return events


def test_backprop_order_matches_a_real_backward_pass():
    model = build_model(tiny(coordconv=True, layers_per_block=[2, 1], heads={"potential": 1}),
                        (12, 12, 3), (10, 10))
    recorded = recorded_gradient_order(model, batch((12, 12, 3)))
    expected = [n.layer for n in backprop_order(model)]
    # 7 dense layers and 2 transitions down (BN + conv each), 2 transitions up, init, head
    assert len(recorded) == len(expected) == 2 * 7 + 2 * 2 + 2 + 1 + 1
    assert [l.name for l in recorded] == [l.name for l in expected]
    forward = [n.layer for n in layer_graph(model) if n.variables]
    assert recorded != forward  # the comparison can fail


def test_backprop_order_two_heads_tie():
    model = build_model(tiny(layers_per_block=[1, 2]), (8, 8, 3))
    recorded = [l.name for l in recorded_gradient_order(model, batch((8, 8, 3)))]
    graph = layer_graph(model)
    expected = [n.name for n in backprop_order(graph)]
    # the heads tie; the one later in the forward order comes first (Keras sorts dict
    # outputs by key, so head_potential is the last layer)
    assert [n.name for n in graph[-2:]] == ["head_displacement", "head_potential"]
    assert expected[:2] == ["head_potential", "head_displacement"]
    assert sorted(recorded[:2]) == sorted(expected[:2])
    assert recorded[2:] == expected[2:]


# ------------------------------------------------------------------------ training
def test_tiny_model_trains():
    tf.keras.utils.set_random_seed(0)
    cfg = tiny(heads={"potential": 1}, layers_per_block=[2], bottleneck_layers=2, growth=4)
    model = build_model(cfg, (16, 16, 2))
    x = batch((16, 16, 2), n=4)
    y = tf.nn.avg_pool2d(x[..., :1] - x[..., 1:], 3, 1, "SAME")  # a smooth map of the input
    optimizer = tf.keras.optimizers.Adam(3e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)["potential"] - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(100)]
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize("input_shape, output_shape, words", [
    ((16, 16), None, ["input_shape (16, 16)", "3 positive integers"]),
    ((16, 0, 3), None, ["input_shape (16, 0, 3)", "positive"]),
    ((16, 16, 3), (8,), ["output_shape (8,)", "2 positive integers"]),
    ((16, 16, 3), (8.5, 8), ["output_shape (8.5, 8)"]),
    ((3, 16, 3), None, ["input_shape (3, 16, 3)", "at least 4", "2**2"]),
])
def test_bad_shapes_are_one_line_errors(input_shape, output_shape, words):
    with pytest.raises(ValueError) as info:
        build_model(tiny(), input_shape, output_shape)
    assert isinstance(info.value, ModelShapeError)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_layer_graph_refuses_a_subclassed_model():
    class Plain(tf.keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional"):
        layer_graph(Plain())


# -------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_model_configs_build(name):
    path = REPO / "configs" / "model" / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = load_config(path, require=("model",)).model
    model = build_model(cfg, (32, 32, 16))
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert params == totals(summarize(model))["params"]
    assert params < (20_000 if name == "tiny" else 200_000)
