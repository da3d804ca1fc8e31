"""FC-DenseNet encoder-decoder: build it, walk its layer graph, tabulate its costs.

Public API
----------
build_model(cfg, input_shape, output_shape=None) -> tf.keras.Model (dict of head outputs)
layer_graph(model) -> list[LayerNode], forward topological order
backprop_order(model) -> list[LayerNode], layers with variables as backprop produces them
model_summary(cfg, input_shape, output_shape=None) -> list[dict]; format_summary(rows) -> str

Importing this package imports TensorFlow.
"""

from stemnet.models.fcdensenet import ModelShapeError, build_model, check_shapes
from stemnet.models.layers import CoordChannels
from stemnet.models.summary import (
    LayerNode,
    backprop_order,
    format_summary,
    layer_graph,
    model_summary,
    summarize,
    totals,
)

__all__ = [
    "CoordChannels",
    "LayerNode",
    "ModelShapeError",
    "backprop_order",
    "build_model",
    "check_shapes",
    "format_summary",
    "layer_graph",
    "model_summary",
    "summarize",
    "totals",
]
