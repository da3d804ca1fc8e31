"""The layer graph of a functional model, the order backprop produces its gradients, and a
per-layer cost table (parameters, gradient bytes, analytic FLOPs).

The graph comes from the Keras functional node API (``model._nodes_by_depth``, each node
knowing its layer and its inbound layers): no layer or variable is found by its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from stemnet.config import ModelConfig

GRAD_BYTES_PER_PARAM = 4  # gradients of float32 (master) variables, also under mixed precision


@dataclass(eq=False)
class LayerNode:
    """One layer of a functional model, as a node of its layer graph.

    Attributes
    ----------
    layer : the Keras layer.
    index : position in the forward topological order.
    inbound : the layers whose outputs this layer consumes (empty for an ``Input``).
    variables : the layer's trainable variables (possibly empty).
    input_shapes, output_shapes : per-sample shapes (no batch axis) of its first call.
    """

    layer: tf.keras.layers.Layer
    index: int
    inbound: Tuple[tf.keras.layers.Layer, ...]
    variables: Tuple[tf.Variable, ...]
    input_shapes: List[Tuple[int, ...]] = field(default_factory=list)
    output_shapes: List[Tuple[int, ...]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.variables))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _shapes(value) -> List[Tuple[int, ...]]:
    """Keras node shapes (one or a list, with a batch axis) -> per-sample tuples."""
    if isinstance(value, tf.TensorShape) or (isinstance(value, tuple) and all(
            v is None or isinstance(v, int) for v in value)):
        value = [value]
    return [tuple(tf.TensorShape(s).as_list()[1:]) for s in value]


def _model_nodes(model: tf.keras.Model) -> list:
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not nodes_by_depth:
        raise ValueError(f"model {model.name!r}: expected a functional tf.keras model (built with tf.keras.Input)")
    return [node for depth in sorted(nodes_by_depth) for node in nodes_by_depth[depth]]


def _topological(layers: list, inbound: Dict[int, list]) -> list:
    """Kahn's algorithm; among ready layers the one first in ``layers`` goes first."""
    rank = {id(layer): i for i, layer in enumerate(layers)}
    pending = {id(layer): len({id(p) for p in inbound[id(layer)]}) for layer in layers}
    consumers: Dict[int, list] = {id(layer): [] for layer in layers}
    for layer in layers:
        for parent in {id(p): p for p in inbound[id(layer)]}.values():
            consumers[id(parent)].append(layer)
    ready = sorted((layer for layer in layers if pending[id(layer)] == 0), key=lambda l: rank[id(l)])
    order = []
    while ready:
        layer = ready.pop(0)
        order.append(layer)
        for child in consumers[id(layer)]:
            pending[id(child)] -= 1
            if pending[id(child)] == 0:
                ready.append(child)
        ready.sort(key=lambda l: rank[id(l)])
    if len(order) != len(layers):
        raise ValueError(f"model {layers[0].name!r}: the layer graph has a cycle")
    return order


def layer_graph(model: tf.keras.Model) -> List[LayerNode]:
    """The layers of a functional ``model`` in forward topological order.

    Every layer comes after all the layers it consumes; ties are broken by the order of
    ``model.layers``. A layer called several times in the model is one node whose
    ``inbound`` is the union over its calls (shapes are those of its first call).
    """
    layers, inbound, first_node = [], {}, {}
    for node in _model_nodes(model):
        layer = node.layer
        if id(layer) not in inbound:
            layers.append(layer)
            inbound[id(layer)] = []
            first_node[id(layer)] = node
        if not node.is_input:
            inbound[id(layer)].extend(_as_list(node.inbound_layers))
    position = {id(layer): i for i, layer in enumerate(model.layers)}
    layers.sort(key=lambda layer: position.get(id(layer), len(position)))
    result = []
    for index, layer in enumerate(_topological(layers, inbound)):
        node = first_node[id(layer)]
        parents = tuple({id(p): p for p in inbound[id(layer)]}.values())
        result.append(LayerNode(layer, index, parents, tuple(layer.trainable_weights),
                                _shapes(node.input_shapes), _shapes(node.output_shapes)))
    return result


def backprop_heights(graph: Sequence[LayerNode]) -> Dict[int, int]:
    """``id(layer)`` -> length of the longest path from the layer to a model output.

    A layer's backward pass can run once every consumer's has: with unlimited
    parallelism it runs at step ``height`` (outputs at 0).
    """
    consumers: Dict[int, list] = {id(n.layer): [] for n in graph}
    for node in graph:
        for parent in node.inbound:
            consumers[id(parent)].append(node)
    height: Dict[int, int] = {}
    for node in reversed(graph):
        after = consumers[id(node.layer)]
        height[id(node.layer)] = 1 + max((height[id(c.layer)] for c in after), default=-1)
    return height


def backprop_order(model_or_graph) -> List[LayerNode]:
    """The layers with trainable variables, in the order backprop produces their gradients.

    Sorted by :func:`backprop_heights` (a layer's gradient needs all its consumers'
    backward passes first), which is a reverse topological order, skip connections
    included. Ties are layers with no path between them (e.g. two heads): the one later in
    the forward order comes first. A single-output FC-DenseNet has no ties except its heads.
    """
    graph = layer_graph(model_or_graph) if isinstance(model_or_graph, tf.keras.Model) else model_or_graph
    height = backprop_heights(graph)
    weighted = [n for n in graph if n.variables]
    return sorted(weighted, key=lambda n: (height[id(n.layer)], -n.index))


# ---------------------------------------------------------------------------- costs
def _conv_flops(node: LayerNode, spatial_shape: Tuple[int, ...]) -> int:
    """2·(spatial positions)·k_h·k_w·C_in·C_out (+ one add per output for the bias)."""
    layer = node.layer
    kh, kw, c_a, c_b = layer.kernel.shape  # Conv2D: (k, k, in, out); transpose: (k, k, out, in)
    flops = 2 * int(np.prod(spatial_shape)) * kh * kw * c_a * c_b
    if layer.use_bias:
        flops += int(np.prod(node.output_shapes[0]))
    return int(flops)


def forward_flops(node: LayerNode) -> int:
    """Analytic forward FLOPs of one layer for one sample.

    - ``Conv2D``: 2·H_out·W_out·k²·C_in·C_out + H_out·W_out·C_out (bias);
    - ``Conv2DTranspose``: 2·H_in·W_in·k²·C_in·C_out + bias (each input pixel scatters);
    - ``BatchNormalization`` (training): 8 per element (statistics 4, normalise and
      scale-shift 4);
    - ``Dense``: 2·(positions)·n_in·n_out + bias;
    - anything else with weights: 2 per parameter (a rough matmul-like figure).
    """
    layer = node.layer
    out_shape = node.output_shapes[0]
    if isinstance(layer, tf.keras.layers.Conv2DTranspose):
        return _conv_flops(node, node.input_shapes[0][:-1])
    if isinstance(layer, tf.keras.layers.Conv2D):
        return _conv_flops(node, out_shape[:-1])
    if isinstance(layer, tf.keras.layers.BatchNormalization):
        return 8 * int(np.prod(out_shape))
    if isinstance(layer, tf.keras.layers.Dense):
        positions = int(np.prod(out_shape[:-1]))
        n_in, n_out = layer.kernel.shape
        return positions * (2 * n_in * n_out + (n_out if layer.use_bias else 0))
    return 2 * node.num_params


def backward_flops(node: LayerNode) -> int:
    """Backward FLOPs ≈ 2 × forward: the input gradient and the weight gradient each cost
    about one forward pass (also counted for the first layer, whose input gradient TF
    computes anyway)."""
    return 2 * forward_flops(node)


def summarize(model: tf.keras.Model) -> List[dict]:
    """One row per layer with trainable variables, in backprop order (see :func:`model_summary`)."""
    rows = []
    for node in backprop_order(model):
        params = node.num_params
        rows.append({
            "name": node.name,
            "type": type(node.layer).__name__,
            "output_shape": node.output_shapes[0],
            "params": params,
            "grad_bytes": GRAD_BYTES_PER_PARAM * params,
            "flops_fwd": forward_flops(node),
            "flops_bwd": backward_flops(node),
        })
    return rows


def model_summary(cfg: ModelConfig, input_shape: Sequence[int],
                  output_shape: Optional[Sequence[int]] = None) -> List[dict]:
    """Build the model of ``cfg`` and tabulate its layers with trainable variables.

    Returns
    -------
    Rows in backprop order, each a dict: ``name``, ``type``, ``output_shape`` (per sample),
    ``params`` (trainable), ``grad_bytes`` (float32), ``flops_fwd`` and ``flops_bwd``
    (per sample, see :func:`forward_flops`). :func:`format_summary` prints them.
    """
    from stemnet.models.fcdensenet import build_model

    return summarize(build_model(cfg, input_shape, output_shape))


def _si(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def totals(rows: Sequence[dict]) -> dict:
    """Sums of ``params``, ``grad_bytes``, ``flops_fwd`` and ``flops_bwd`` over ``rows``."""
    return {key: sum(r[key] for r in rows) for key in ("params", "grad_bytes", "flops_fwd", "flops_bwd")}


def format_summary(rows: Sequence[dict]) -> str:
    """A text table of :func:`model_summary` rows with a totals line (FLOPs per sample)."""
    header = ("#", "layer", "type", "output", "params", "grad bytes", "fwd FLOPs", "bwd FLOPs")
    table = [header]
    for i, r in enumerate(rows):
        shape = "x".join(str(s) for s in r["output_shape"])
        table.append((str(i), r["name"], r["type"], shape, f"{r['params']:,}", _si(r["grad_bytes"]),
                      _si(r["flops_fwd"]), _si(r["flops_bwd"])))
    t = totals(rows)
    table.append(("", "total", f"{len(rows)} layers", "", f"{t['params']:,}", _si(t["grad_bytes"]),
                  _si(t["flops_fwd"]), _si(t["flops_bwd"])))
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    left = {1, 2, 3}

    def line(row):
        return "  ".join(cell.ljust(w) if c in left else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, table[1:-1]), rule, line(table[-1])])
