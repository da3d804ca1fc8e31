"""Gradient grouping strategies for ``hvd.DistributedGradientTape(tape, groups=...)``.

``none``     Horovod's own tensor fusion (groups=None);
``count:N``  N equal contiguous chunks of the variable list (groups=N);
``layer``    one group per layer, in backprop order (the SC19 runs);
``graph``    layers in the order backprop produces their gradients (reverse topological
             order of the layer graph, skip connections included), packed into groups of
             at most ``group_bytes`` — the first group at most ``first_group_bytes`` so the
             first allreduce starts early — never splitting a layer; a single layer larger
             than the budget gets a group of its own.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np

Groups = Union[None, int, List[list]]


def _nbytes(variables, bytes_per_element: int) -> int:
    return sum(int(np.prod(v.shape)) * bytes_per_element for v in variables)


def pack_layers(
    layer_variables: Sequence[Sequence],
    *,
    group_bytes: int,
    first_group_bytes: int,
    bytes_per_element: int = 4,
) -> List[list]:
    """Pack per-layer variable lists (in gradient-ready order) into byte-bounded groups."""
    groups: List[list] = []
    current: list = []
    size = 0
    for variables in layer_variables:
        if not variables:
            continue
        layer_size = _nbytes(variables, bytes_per_element)
        budget = first_group_bytes if not groups else group_bytes
        if current and size + layer_size > budget:
            groups.append(current)
            current, size = [], 0
        current = current + list(variables)
        size += layer_size
    if current:
        groups.append(current)
    return groups


def make_groups(
    model,
    strategy: str,
    *,
    group_bytes: int = 16 << 20,
    first_group_bytes: int = 1 << 20,
    bytes_per_element: int = 4,
) -> Groups:
    """The ``groups`` argument for Horovod's DistributedGradientTape for ``strategy``."""
    if strategy == "none":
        return None
    if strategy.startswith("count:"):
        count = int(strategy.split(":", 1)[1])
        return max(1, min(count, len(model.trainable_variables)))
    from stemnet.models import backprop_order

    per_layer = [list(node.variables) for node in backprop_order(model)]
    if strategy == "layer":
        return [layer for layer in per_layer if layer]
    if strategy == "graph":
        return pack_layers(per_layer, group_bytes=group_bytes, first_group_bytes=first_group_bytes,
                           bytes_per_element=bytes_per_element)
    raise ValueError(f"distributed.grouping: expected none, layer, graph or count:N, got {strategy!r}")


def describe(groups: Groups, bytes_per_element: int = 4) -> str:
    """One line: how many groups and their sizes (for the log)."""
    if groups is None:
        return "Horovod tensor fusion (no explicit groups)"
    if isinstance(groups, int):
        return f"{groups} equal chunks"
    sizes = [_nbytes(g, bytes_per_element) / 2**20 for g in groups]
    return f"{len(groups)} groups, {min(sizes):.2f}-{max(sizes):.2f} MiB (first {sizes[0]:.2f} MiB)"


def group_of(groups: Optional[List[list]], variable) -> int:
    """Index of the group holding ``variable`` (for tests and the scaling model)."""
    for i, group in enumerate(groups or []):
        if any(v is variable for v in group):
            return i
    raise KeyError(getattr(variable, "name", variable))
