"""The scaling model: hand-computed figures on a toy, and what it implies for the FC-DenseNet."""

import json
from pathlib import Path

import pytest
import yaml

from stemnet.config import DistributedConfig
from stemnet.hpc.machines import MACHINES_DIR, ProfileError, load_network
from stemnet.distributed.scaling import (
    ControlPlane,
    LayerCost,
    ScalingError,
    Workload,
    allreduce_seconds,
    format_prediction,
    plan_groups,
    predict,
    scaling_report,
    simulate_step,
)

REPO = Path(__file__).resolve().parents[1]
MS, US = 1e-3, 1e-6

# A toy machine with round numbers: 4 GPUs per node, 10 GB/s everywhere,
# 1 us per intra-node ring step, 10 us per inter-node step, 5 us per allreduce.
TOY_MACHINE = {
    "network": {
        "description": "toy",
        "gpus_per_node": 4,
        "max_nodes": 8,
        "peak_tflops": {"float32": 1.0},
        "compute_efficiency": 1.0,
        "memory_bandwidth_gbs": 100.0,
        "intra_node": {"bandwidth_gbs": 10.0, "latency_us": 1.0},
        "inter_node": {"bandwidth_gbs": 10.0, "latency_us": 10.0, "algorithm": "ring"},
        "allreduce_overhead_us": 5.0,
    }
}

# Two layers in backprop order: the head A (10 MB of gradients, 1.5 ms of backward: ready
# at 1.5 ms), then the stem B (20 MB, 2.2 ms: ready at 3.7 ms). Forward 2 ms, update 0.5 ms.
TOY = Workload(
    layers=(LayerCost("A", 10_000_000, 1.5 * MS), LayerCost("B", 20_000_000, 2.2 * MS)),
    forward_s=2.0 * MS,
    update_s=0.5 * MS,
)


@pytest.fixture
def toy_net(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY_MACHINE))
    return load_network(path)


def toy_dist(**kw):
    base = dict(cycle_time_ms=1.0, fusion_threshold_mib=64.0, group_bytes_mib=16.0, first_group_bytes_mib=1.0)
    base.update(kw)
    return DistributedConfig(**base)


def test_allreduce_alpha_beta_by_hand(toy_net):
    # 8 GPUs = 2 nodes of L = 4 GPUs; S = 10 MB.
    # intra ring: 2(L-1)·α + 2(L-1)/L·S/B = 6·1 us + 1.5·(1e7 / 1e10 s) = 6 us + 1.5 ms
    # inter ring over M = 2 nodes: 2(M-1)·α + 2(M-1)/M·S/B = 20 us + 1 ms
    assert allreduce_seconds(1e7, 8, toy_net) == pytest.approx(1.5 * MS + 6 * US + 1.0 * MS + 20 * US)
    # tree over 2 nodes: 2·ceil(log2 2)·α + 2·S/B = 20 us + 2 ms
    assert allreduce_seconds(1e7, 8, toy_net, "tree") == pytest.approx(1.5 * MS + 6 * US + 2.0 * MS + 20 * US)
    # 4 GPUs: one node, the intra-node ring only; 1 GPU: nothing to reduce
    assert allreduce_seconds(1e7, 4, toy_net) == pytest.approx(1.5 * MS + 6 * US)
    assert allreduce_seconds(1e7, 1, toy_net) == 0.0
    # 32 GPUs = 8 nodes, ring: 2·7·10 us + 2·7/8·1 ms = 140 us + 1.75 ms (+ intra 1.506 ms)
    assert allreduce_seconds(1e7, 32, toy_net) == pytest.approx(1.506 * MS + 140 * US + 1.75 * MS)
    # tree: 2·ceil(log2 8)·10 us + 2 ms = 60 us + 2 ms
    assert allreduce_seconds(1e7, 32, toy_net, "tree") == pytest.approx(1.506 * MS + 60 * US + 2.0 * MS)


def test_the_scaling_model_reproduces_hand_computed_figures_on_a_two_layer_toy(toy_net):
    # On 8 GPUs (ring), one allreduce of S bytes costs 5 us overhead + 26 us + 2.5·S/1e10 s:
    #   A (1e7 B): 2.5 ms + 31 us = 2.531 ms;  B (2e7 B): 5.031 ms;  A+B (3e7 B): 7.531 ms.
    # T(1) = forward 2 + backward (1.5 + 2.2) + update 0.5 = 6.2 ms (no allreduce at 1 GPU).
    dist = toy_dist()
    t1 = simulate_step(TOY, "layer", 1, toy_net, dist=dist)
    assert t1.step_s == pytest.approx(6.2 * MS) and t1.allreduces == 0

    # layer: A starts when ready at 1.5 ms, ends 4.031 ms; B is ready at 3.7 ms but the
    # stream is busy: starts 4.031, ends 9.062 ms. Step = 2 + max(3.7, 9.062) + 0.5.
    layer = simulate_step(TOY, "layer", 8, toy_net, dist=dist)
    assert layer.allreduces == 2
    assert layer.comm_end_s == pytest.approx(9.062 * MS)
    assert layer.step_s == pytest.approx(11.562 * MS)
    assert layer.exposed_s == pytest.approx(9.062 * MS - 3.7 * MS)

    # count:1: one group of 3e7 B, ready when B is (3.7 ms): ends 3.7 + 7.531 = 11.231 ms.
    count1 = simulate_step(TOY, "count:1", 8, toy_net, dist=dist)
    assert count1.allreduces == 1
    assert count1.step_s == pytest.approx(2 * MS + 11.231 * MS + 0.5 * MS)  # 13.731 ms
    # count:2 splits the tape order [B, A] (forward order) into [B], [A]: the same as layer.
    assert simulate_step(TOY, "count:2", 8, toy_net, dist=dist).step_s == pytest.approx(layer.step_s)

    # none, 1 ms cycle: A (ready 1.5) goes at tick 2 ms, ends 4.531; B (ready 3.7) at tick
    # 4 ms, waits for the stream until 4.531, ends 9.562 ms. Step = 2 + 9.562 + 0.5.
    none = simulate_step(TOY, "none", 8, toy_net, dist=dist)
    assert none.allreduces == 2
    assert none.step_s == pytest.approx(12.062 * MS)
    # none, 5 ms cycle: both are ready by the tick at 5 ms and fused (3e7 B < 64 MiB):
    # 5 + 7.531 = 12.531 ms; step 2 + 12.531 + 0.5 = 15.031 ms.
    fused = simulate_step(TOY, "none", 8, toy_net, dist=toy_dist(cycle_time_ms=5.0))
    assert fused.allreduces == 1 and fused.step_s == pytest.approx(15.031 * MS)
    # ... unless the fusion buffer (15 MiB = 15.7 MB) cannot hold both: A 5 -> 7.531,
    # B 7.531 -> 12.562 ms; step 15.062 ms.
    split = simulate_step(TOY, "none", 8, toy_net, dist=toy_dist(cycle_time_ms=5.0, fusion_threshold_mib=15.0))
    assert split.allreduces == 2 and split.step_s == pytest.approx(15.062 * MS)

    # cycle_groups: layer groups also wait for ticks -> the same schedule as none at 1 ms.
    assert simulate_step(TOY, "layer", 8, toy_net, dist=dist, cycle_groups=True).step_s == pytest.approx(12.062 * MS)

    # fp16 compression halves the wire bytes: A 1.25 ms + 31 us = 1.281 -> ends 2.781;
    # B 2.5 ms + 31 us starts at 3.7, ends 6.231 ms; step 2 + 6.231 + 0.5 = 8.731 ms.
    fp16 = simulate_step(TOY, "layer", 8, toy_net, dist=toy_dist(compression="fp16"))
    assert fp16.step_s == pytest.approx(8.731 * MS)

    # graph with a 1 MiB first group: A (9.5 MiB) alone, then B -> the layer schedule;
    # with 64 MiB budgets everything is one group -> the count:1 schedule.
    assert [g.nbytes for g in plan_groups(TOY, "graph", first_group_bytes=1 << 20)] == [10_000_000, 20_000_000]
    assert simulate_step(TOY, "graph", 8, toy_net, dist=dist).step_s == pytest.approx(layer.step_s)
    big = toy_dist(group_bytes_mib=64.0, first_group_bytes_mib=64.0)
    assert simulate_step(TOY, "graph", 8, toy_net, dist=big).step_s == pytest.approx(count1.step_s)

    # efficiency T(1)/T(N) in the table, and the JSON round trip
    table = predict(TOY, toy_net, [1, 8], ["none", "count:1", "layer"], dist=dist, machine="toy")
    assert table["rows"][0]["layer"]["efficiency"] == pytest.approx(1.0)
    assert table["rows"][1]["layer"]["efficiency"] == pytest.approx(6.2 / 11.562)
    assert table["rows"][1]["count:1"]["efficiency"] == pytest.approx(6.2 / 13.731)
    assert json.loads(json.dumps(table))["rows"][1]["none"]["allreduces"] == 2
    text = format_prediction(table)
    assert "11.56" in text and "0.536" in text


def test_horovod_negotiation_delays_and_spaces_the_cycles_by_hand(toy_net):
    """The control plane on the toy (8 GPUs, 1 ms cycle; A 2.531 ms, B 5.031 ms per allreduce)."""
    dist = toy_dist()
    # point_to_point, 10 us per message at rank 0, 7 other ranks: an idle cycle is the 1 ms
    # sleep + 2 x 7 x 10 us = 1.14 ms. A (ready 1.5) is taken by the cycle at 2.28 ms, whose
    # 2 messages in per rank and the response out take 3 x 70 us: A starts 2.49, ends 5.021;
    # the cycle ends with DONE (70 us) and the sleep: 3.56 ms. B (ready 3.7) waits for the
    # cycle at 4.70, starts 4.91, the stream frees at 5.021: ends 10.052 ms.
    p2p = ControlPlane("point_to_point", 10.0)
    step = simulate_step(TOY, "none", 8, toy_net, dist=dist, control=p2p)
    assert step.allreduces == 2 and step.step_s == pytest.approx((2 + 10.052 + 0.5) * MS)
    # explicit groups waiting for the cycle (one allreduce each) follow the same schedule
    assert simulate_step(TOY, "layer", 8, toy_net, dist=dist, control=p2p, cycle_groups=True).step_s == \
        pytest.approx(step.step_s)
    # collective: gather + broadcast, 2 x ceil(log2 8) x 10 us = 60 us after each 1 ms tick:
    # A 2.06 -> 4.591, B (tick 4) waits for the stream: 4.591 -> 9.622 ms.
    coll = simulate_step(TOY, "none", 8, toy_net, dist=dist, control=ControlPlane("collective", 10.0))
    assert coll.step_s == pytest.approx((2 + 9.622 + 0.5) * MS)
    # three small layers (1 MB: 0.281 ms each, the stream never waits), ready at 0.5, 1.6
    # and 2.7 ms, one per cycle. point_to_point: C taken at 1.14 starts 1.35; that cycle
    # ends 1.14 + 4 x 70 us + the 1 ms sleep = 2.42, takes D (starts 2.63); the next, at
    # 3.70, takes E: starts 3.91, ends 4.191 ms.
    small = Workload(tuple(LayerCost(n, 1_000_000, b * MS) for n, b in (("C", 0.5), ("D", 1.1), ("E", 1.1))),
                     forward_s=1.0 * MS, update_s=0.0)
    assert simulate_step(small, "none", 8, toy_net, dist=dist, control=p2p).step_s == pytest.approx(5.191 * MS)
    # a negotiation longer than the cycle (6 x 200 us = 1.2 ms) spaces the cycles by 1.2 ms:
    # C at 1.2 starts 2.4, D at 2.4 starts 3.6, E at 3.6 starts 4.8 and ends 5.081 ms.
    slow = simulate_step(small, "none", 8, toy_net, dist=dist, control=ControlPlane("collective", 200.0))
    assert slow.allreduces == 3 and slow.step_s == pytest.approx(6.081 * MS)
    # the default is free, every 1 ms (the none schedule above); one GPU has no cycle
    assert simulate_step(TOY, "none", 8, toy_net, dist=dist, control=ControlPlane()).step_s == \
        pytest.approx(12.062 * MS)
    assert simulate_step(TOY, "none", 1, toy_net, dist=dist, control=p2p).step_s == pytest.approx(6.2 * MS)
    with pytest.raises(ScalingError, match="expected collective or point_to_point"):
        ControlPlane("gossip", 1.0)


def test_more_gpus_than_the_machine_or_a_bad_strategy_is_a_one_line_error(toy_net):
    with pytest.raises(ScalingError, match="more than the machine's 32 GPUs"):
        simulate_step(TOY, "layer", 40, toy_net)
    with pytest.raises(ScalingError, match="expected none, layer, graph or count:N"):
        predict(TOY, toy_net, [8], ["bucket"])
    with pytest.raises(ScalingError, match="count:N with N > 0"):
        plan_groups(TOY, "count:0")


@pytest.mark.parametrize("name", ["summit", "frontier", "perlmutter", "local", "localslurm"])
def test_shipped_machine_descriptions_load(name):
    net = load_network(name)
    assert net.gpus_per_node >= 1 and net.flop_rate("float32") > 0
    assert (MACHINES_DIR / f"{name}.yaml").is_file(), name


def test_machine_description_refuses_unknown_keys(tmp_path):
    data = json.loads(json.dumps(TOY_MACHINE))
    data["network"]["intra_node"]["bandwith_gbs"] = 1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"bad.yaml: network.intra_node.bandwith_gbs: unknown key; "
                                           r"did you mean 'bandwidth_gbs'\?"):
        load_network(path)
    with pytest.raises(ProfileError, match="machine no-such-machine: unknown machine; expected one of .*summit"):
        load_network("no-such-machine")
    profile_only = tmp_path / "profile-only.yaml"
    profile_only.write_text(yaml.safe_dump({"machine": {"scheduler": "lsf"}}))
    with pytest.raises(ProfileError, match=r"profile-only.yaml: network: missing section"):
        load_network(profile_only)
    # a merged machine profile with other sections is fine: only network: is read
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump({"machine": {"scheduler": "lsf"}, **TOY_MACHINE}))
    assert load_network(merged).gpus_per_node == 4


@pytest.fixture(scope="module")
def summit_fcdensenet():
    """The demo FC-DenseNet on a paper-like stand-in input, analytic compute on Summit."""
    return scaling_report(REPO / "configs/model/demo.yaml", "summit", [1, 6, 96, 1536, 27600],
                          input_shape=(256, 256, 64), output_shape=(256, 256), batch=1,
                          precision="mixed_float16", strategies=["none", "count:4", "layer", "graph"])


def test_fcdensenet_on_summit_efficiency_is_one_at_one_gpu_and_falls_with_gpus(summit_fcdensenet):
    rows = summit_fcdensenet["rows"]
    for strategy in summit_fcdensenet["strategies"]:
        eff = [row[strategy]["efficiency"] for row in rows]
        assert eff[0] == pytest.approx(1.0)
        assert all(a > b for a, b in zip(eff, eff[1:])), (strategy, eff)
        assert all(0 < e <= 1 for e in eff)


def test_fcdensenet_on_summit_graph_beats_layer_and_count_at_scale(summit_fcdensenet):
    # The demo model has 79k parameters (0.30 MiB of float32 gradients) in 35 layers and a
    # sub-millisecond fp16 backprop on a V100: every allreduce is latency bound.
    # - graph packs everything into one group (it fits the 1 MiB first group): one
    #   latency per step, so it beats layer (35 allreduces) at every scale;
    # - count:4 overlaps part of its 4 allreduces with backprop, which wins on one node,
    #   but its 4 latencies lose to graph's one from 1536 GPUs on;
    # - none waits for Horovod's 1 ms cycle, longer than the whole backprop here.
    rows = {row["gpus"]: row for row in summit_fcdensenet["rows"]}
    assert summit_fcdensenet["groups"] == {"none": None, "count:4": 4, "layer": 36, "graph": 1}
    for n, row in rows.items():
        assert row["graph"]["efficiency"] >= row["layer"]["efficiency"]
    for n in (1536, 27600):
        assert rows[n]["graph"]["efficiency"] > rows[n]["count:4"]["efficiency"] > rows[n]["none"]["efficiency"]
    assert rows[6]["count:4"]["efficiency"] > rows[6]["graph"]["efficiency"]
    assert 0.6 < rows[27600]["graph"]["efficiency"] < 0.9


def test_measured_workload_apportions_the_measured_backward_by_flops():
    from stemnet.config import load_config
    from stemnet.distributed.scaling import measure_workload

    cfg = load_config(REPO / "configs/model/tiny.yaml", require=("model",)).model
    work = measure_workload(cfg, (16, 16, 4), batch=2, repeats=2)
    assert work.forward_s > 0 and work.update_s > 0 and work.backward_s >= 0
    assert "measured" in work.source
    layers = work.layers
    from stemnet.models import model_summary

    rows = model_summary(cfg, (16, 16, 4))
    assert [l.name for l in layers] == [r["name"] for r in rows]
    total = sum(r["flops_bwd"] for r in rows)
    for layer, row in zip(layers, rows):
        assert layer.backward_s == pytest.approx(work.backward_s * row["flops_bwd"] / total)
    assert sum(b for _, b in work.tape_order) == work.grad_bytes
