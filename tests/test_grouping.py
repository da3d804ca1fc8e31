"""Gradient groups: a partition of the variables, layers kept whole, byte budgets, and
the order in which a real backward pass produces the gradients."""

import numpy as np
import pytest
import tensorflow as tf

from stemnet.config import ModelConfig
from stemnet.distributed.grouping import make_groups, pack_layers
from stemnet.models import backprop_order, build_model

from test_models import batch, recorded_gradient_order

CFG = ModelConfig(initial_filters=8, growth=4, layers_per_block=[2, 2], bottleneck_layers=2,
                  heads={"potential": 1}, coordconv=True)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, (16, 16, 3), (16, 16))


def nbytes(variables):
    return sum(int(np.prod(v.shape)) * 4 for v in variables)


def owners(model):
    """variable ref -> the layer that owns it (from the layer graph, not from names)."""
    return {v.ref(): node.layer for node in backprop_order(model) for v in node.variables}


@pytest.mark.parametrize("strategy", ["layer", "graph"])
def test_groups_partition_the_variables_exactly_once(model, strategy):
    groups = make_groups(model, strategy, group_bytes=8 << 10, first_group_bytes=2 << 10)
    refs = [v.ref() for g in groups for v in g]
    assert len(refs) == len(set(refs)) == len(model.trainable_variables)
    assert set(refs) == {v.ref() for v in model.trainable_variables}


@pytest.mark.parametrize("strategy", ["layer", "graph"])
def test_groups_never_split_a_layer(model, strategy):
    groups = make_groups(model, strategy, group_bytes=8 << 10, first_group_bytes=2 << 10)
    owner = owners(model)
    group_of_layer = {}
    for i, group in enumerate(groups):
        for v in group:
            assert group_of_layer.setdefault(owner[v.ref()].name, i) == i


def test_graph_groups_respect_the_byte_budget(model):
    budget, first = 8 << 10, 2 << 10
    groups = make_groups(model, "graph", group_bytes=budget, first_group_bytes=first)
    assert len(groups) > 3
    owner = owners(model)
    for i, group in enumerate(groups):
        limit = first if i == 0 else budget
        layers = {owner[v.ref()].name for v in group}
        # over the budget only when the group is a single layer that alone exceeds it
        assert nbytes(group) <= limit or len(layers) == 1, (i, nbytes(group), layers)
    # packing is greedy: no group could also have taken the next group's first layer
    for i in range(len(groups) - 1):
        nxt = groups[i + 1]
        first_layer = [v for v in nxt if owner[v.ref()] is owner[nxt[0].ref()]]
        limit = first if i == 0 else budget
        assert nbytes(groups[i]) + nbytes(first_layer) > limit


def test_single_oversized_layer_gets_its_own_group():
    small = [tf.Variable(np.zeros(10, np.float32))]
    big = [tf.Variable(np.zeros((100, 100), np.float32))]
    groups = pack_layers([small, big, small, small], group_bytes=1000, first_group_bytes=100)
    assert [len(g) for g in groups] == [1, 1, 2]
    assert groups[1][0] is big[0]


def test_groups_follow_the_recorded_backprop_order(model):
    """Concatenated groups list the layers in the order a real backward pass finishes them."""
    recorded = recorded_gradient_order(model, batch((16, 16, 3)))
    owner = owners(model)
    for strategy in ("layer", "graph"):
        groups = make_groups(model, strategy, group_bytes=8 << 10, first_group_bytes=2 << 10)
        order = []
        for group in groups:
            for v in group:
                name = owner[v.ref()].name
                if not order or order[-1] != name:
                    order.append(name)
        assert order == [layer.name for layer in recorded], strategy


def test_none_and_count(model):
    assert make_groups(model, "none") is None
    assert make_groups(model, "count:4") == 4
    assert make_groups(model, "count:100000") == len(model.trainable_variables)
