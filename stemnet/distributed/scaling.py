"""A scaling model: predicted step time and parallel efficiency of data-parallel training
for each gradient-grouping strategy, from per-layer costs and a machine description.

The model, in the words a README can quote
------------------------------------------
*Weak scaling*: every GPU keeps the same batch, so the compute per GPU does not change with
the number of GPUs N; only the gradient allreduce does. One training step is

    T(N) = forward + max(backward end, end of the last allreduce) + optimizer update

and the parallel efficiency is ``T(1) / T(N)`` (at one GPU Horovod reduces nothing).

**Compute.** Layers produce their gradients in backprop order (``stemnet.models
.backprop_order``); layer *i*'s gradient is ready at the cumulative backward time of the
layers before it, itself included. Per-layer backward times come either from analytic
FLOPs (``stemnet.models.model_summary``: 2× the forward FLOPs) divided by the machine's
peak FLOP rate times a ``compute_efficiency`` factor, or -- with ``--measure`` -- from
timing the forward pass and the forward+backward pass of the whole model on *this* host
and apportioning the backward time to the layers in proportion to their analytic backward
FLOPs (per-layer timing is too noisy on shared CPUs; apportioning keeps the total exact).
The optimizer update is memory bound: 28 bytes per parameter (Adam reads parameter,
gradient and two moments, writes three) over the machine's memory bandwidth.

**Communication** (α-β model of a hierarchical allreduce of S bytes on N GPUs, L GPUs per
node, M = ⌈N/L⌉ nodes; α latency per step, B bandwidth per direction):

- inside a node, a ring over the L GPUs (NVLink): reduce-scatter then all-gather,
  ``2(L-1)·α_intra + 2(L-1)/L · S/B_intra``;
- across nodes, each of the L GPUs allreduces its 1/L shard among the M nodes; the L shards
  share the node's injection bandwidth ``B_node``:
  ring ``2(M-1)·α_inter + 2(M-1)/M · S/B_node``, or
  tree (NCCL's double binary tree, pipelined) ``2⌈log2 M⌉·α_inter + 2·S/B_node``;
- or, ``algorithm: flat`` (NCCL rings before hierarchies and trees), one ring through all
  N GPUs: ``2(N-M)·α_intra + 2(M-1)·α_inter + 2(N-1)/N · S/min(B_intra, B_node)`` (of a
  chunk's 2(N-1) hops only 2(M-1) cross the network, as in NCCL's own tuning model);
- plus ``allreduce_overhead`` per allreduce (Horovod's launch and, with the response
  cache, its small per-cycle coordination).

Wire bytes are float32 gradients (4 bytes per parameter), halved by fp16 compression.

**Overlap.** One communication stream reduces one buffer at a time:

- ``layer``, ``graph``, ``count:N``: the groups of ``stemnet.distributed.grouping``
  (``graph`` packs layers with the very same ``pack_layers``; ``count:N`` splits the
  gradient list in the order the tape returns it -- ``model.trainable_variables``, forward
  order -- into N equal-count chunks, as Horovod does). A group can start when the last of
  its gradients is ready; groups go in order of readiness, each at
  ``max(ready, end of the previous group)``.
- ``none`` (Horovod's tensor fusion) is approximated as Horovod's background cycle: each
  cycle (the first at the start of backprop) packs the gradients that became ready since
  the previous one, in order, into fusion buffers of at most ``fusion_threshold_mib``,
  negotiates them, and queues each buffer as one allreduce on the stream at
  ``max(end of negotiation, end of the previous buffer)``. The negotiation is a
  :class:`ControlPlane`: by default free, with a cycle every ``cycle_time_ms``; Horovod
  <= 0.13.3 sent every rank's messages through rank 0 one at a time and slept a full
  ``cycle_time_ms`` after each cycle (``point_to_point``), later releases gather and
  broadcast (``collective``, 2⌈log2 N⌉ message times, a cycle every ``cycle_time_ms``
  or when the last one is done). The real cycle phase is arbitrary (about half a cycle
  of extra latency on average) and the per-rank readiness skew is ignored.
- Explicit groups are *not* quantised to cycle ticks by default, as the issue specifies;
  in Horovod they too wait for the next cycle (``cycle_groups=True``, ``--cycle-groups``,
  applies the same ticks to them). With backprop much longer than ``cycle_time_ms`` this
  hardly matters; with a sub-millisecond backprop it decides ``none`` against the rest.

**No separate engine.** On CPU ranks (``comm_overlaps_compute: false``, the local
profile) the reduction's copies and sums run on the core that computes: the step is then
at least forward + backward + the α-β transfer time of every allreduce + update. The
per-allreduce overhead (Horovod's cycle wait and negotiation, a message round trip) is
waiting, not work: it delays the stream, not the compute.

**The rest of the step.** ``Workload.other_s`` (loss, metrics, op dispatch; measured by
``--calibrate`` as the training step without collectives minus forward, backward and
update) is added serially: T(N) = forward + tail + update + other.

Not modelled: contention with other jobs, stragglers and rank skew (the negotiation wait a
timeline shows), memory copies into fusion buffers, compute slowed by communication
kernels, the input pipeline. The figures are a model for comparing strategies and seeing
where the time goes, not a promise.

Machine descriptions are the ``network:`` section of ``configs/machines/<name>.yaml`` (the
same profiles ``stemnet submit`` reads their ``machine:`` section from), or of any YAML
path, loaded by ``stemnet.hpc.machines.load_network``; see :class:`~stemnet.hpc.machines.Network`.

Public API
----------
allreduce_seconds(nbytes, gpus, network, algorithm=None) -> float
LayerCost, Workload; profile_model(cfg, input_shape, output_shape) -> (rows, tape_order, model)
analytic_workload(rows, network, ...) -> Workload; measure_workload(cfg, input_shape, ...) -> Workload
plan_groups(workload, strategy, ...) -> list[Group] | None
ControlPlane(kind, message_us); simulate_step(workload, strategy, gpus, network, ...) -> StepTime
predict(workload, network, gpus, strategies, ...) -> dict; format_prediction(prediction) -> str
scaling_report(config_path, machine, gpus, ...) -> dict  (what ``stemnet scaling`` runs)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from stemnet.config import GROUPING_PATTERN, DistributedConfig
from stemnet.distributed.grouping import pack_layers
from stemnet.errors import argument
from stemnet.distributed.workload import (  # noqa: F401  (public here too)
    LayerCost,
    Workload,
    analytic_workload,
    measure_workload,
    profile_model,
)
from stemnet.hpc.machines import Network, ProfileError, load_network

DEFAULT_STRATEGIES = ("none", "count:4", "layer", "graph")


class ScalingError(ProfileError):
    """A bad scaling request, as one line."""


# ---------------------------------------------------------------------- allreduce cost
def allreduce_seconds(nbytes: float, gpus: int, network: Network, algorithm: Optional[str] = None) -> float:
    """α-β time of one hierarchical allreduce of ``nbytes`` on ``gpus`` GPUs (no overhead).

    Intra-node ring over L = min(gpus, gpus_per_node) GPUs, then (M = ⌈gpus/L⌉ > 1 nodes)
    an inter-node ring or tree over the node's injection bandwidth; see the module notes.
    """
    if gpus <= 1 or nbytes <= 0:
        return 0.0
    local = min(gpus, network.gpus_per_node)
    nodes = math.ceil(gpus / local)
    intra = network.intra_node
    if nodes > 1 and network.inter_node is not None and (algorithm or network.inter_node.algorithm) == "flat":
        inter = network.inter_node  # one ring through all GPUs, its bytes at the slowest link
        slowest = min(intra.bandwidth_gbs, inter.bandwidth_gbs) * 1e9
        # a chunk's path: 2(N-1) hops, of which 2(M-1) cross the network (the ring enters and
        # leaves each node once per pass); the others stay inside a node (NCCL's own tuning
        # model, src/graph/tuning.cc: (nsteps - nInterSteps)*intraLat + nInterSteps*interLat)
        inter_steps = 2 * (nodes - 1)
        latency = (2 * (gpus - 1) - inter_steps) * intra.latency_us + inter_steps * inter.latency_us
        return latency * 1e-6 + 2 * (gpus - 1) / gpus * nbytes / slowest
    t = 2 * (local - 1) * intra.latency_us * 1e-6 + 2 * (local - 1) / local * nbytes / (intra.bandwidth_gbs * 1e9)
    if nodes > 1:
        inter = network.inter_node
        if inter is None:
            raise ScalingError(f"{gpus} GPUs need {nodes} nodes but the machine has no inter_node link")
        algo = algorithm or inter.algorithm
        alpha, beta = inter.latency_us * 1e-6, 1.0 / (inter.bandwidth_gbs * 1e9)
        if algo == "ring":
            t += 2 * (nodes - 1) * alpha + 2 * (nodes - 1) / nodes * nbytes * beta
        elif algo == "tree":
            t += 2 * math.ceil(math.log2(nodes)) * alpha + 2 * nbytes * beta
        else:
            raise ScalingError(f"--algorithm: expected ring, tree or flat, got {algo!r}")
    return t


# ------------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class Group:
    """One allreduce: when its last gradient is ready (s after backprop starts), its bytes."""

    ready_s: float
    nbytes: int


class _Chunk:
    """A layer's gradient as ``pack_layers`` sees a variable: an object with ``.shape``."""

    def __init__(self, layer: int, nbytes: int):
        self.layer = layer
        self.shape = (nbytes,)


def _split_list(items: list, n: int) -> List[list]:
    """Horovod's ``split_list``: ``n`` contiguous chunks whose lengths differ by at most one."""
    d, r = divmod(len(items), n)
    return [items[i * d + min(i, r):(i + 1) * d + min(i + 1, r)] for i in range(n)]


def plan_groups(workload: Workload, strategy: str, *, group_bytes: int = 16 << 20,
                first_group_bytes: int = 1 << 20) -> Optional[List[Group]]:
    """The allreduces ``strategy`` makes of ``workload``'s gradients, in order of readiness.

    ``None`` for ``none`` (Horovod fusion is simulated cycle by cycle, not planned).
    Bytes are float32 gradient bytes (the budgets of ``graph`` are float32 bytes too).
    """
    ready = workload.ready_times()
    if strategy == "none":
        return None
    if strategy == "layer":
        groups = [Group(ready[i], layer.grad_bytes) for i, layer in enumerate(workload.layers) if layer.grad_bytes]
    elif strategy == "graph":
        per_layer = [[_Chunk(i, layer.grad_bytes)] for i, layer in enumerate(workload.layers) if layer.grad_bytes]
        packed = pack_layers(per_layer, group_bytes=group_bytes, first_group_bytes=first_group_bytes,
                             bytes_per_element=1)
        groups = [Group(max(ready[c.layer] for c in g), sum(c.shape[0] for c in g)) for g in packed]
    elif strategy.startswith("count:"):
        try:
            count = int(strategy.split(":", 1)[1])
        except ValueError:
            count = 0
        if count < 1:
            raise ScalingError(f"strategy {strategy!r}: expected count:N with N > 0")
        variables = list(workload.tape_order)
        chunks = _split_list(variables, max(1, min(count, len(variables))))
        groups = [Group(max(ready[i] for i, _ in c), sum(b for _, b in c)) for c in chunks if c]
    else:
        raise ScalingError(f"strategy {strategy!r}: expected none, layer, graph or count:N")
    return sorted(groups, key=lambda g: g.ready_s)


# ---------------------------------------------------------------------------- schedule
@dataclass
class StepTime:
    """One predicted step on ``gpus`` GPUs with one strategy (seconds)."""

    strategy: str
    gpus: int
    forward_s: float
    backward_s: float
    update_s: float
    comm_end_s: float  # end of the last allreduce, from the start of backprop
    comm_busy_s: float  # total time the communication stream is busy
    allreduces: int
    step_s: float
    exposed_s: float = field(init=False)  # communication not hidden behind backprop

    def __post_init__(self):
        self.exposed_s = max(0.0, self.comm_end_s - self.backward_s)


@dataclass(frozen=True)
class ControlPlane:
    """Horovod's negotiation in each background cycle: which tensors every rank has ready.

    ``collective`` (Horovod >= 0.13.4): an MPI_Gather and an MPI_Bcast of the requests,
    2⌈log2 N⌉ message times; a cycle starts every ``cycle_time_ms`` or when the previous
    one is done, whichever is later. ``point_to_point`` (Horovod <= 0.13.3): rank 0 takes
    every rank's request list and DONE message, then sends every rank each fused response
    (the ranks start that allreduce on receipt) and a DONE, one message at a time, then
    sleeps a full ``cycle_time_ms``. ``message_us``: one control message's cost at rank 0.
    The default (collective, 0 µs) is a cycle on a fixed grid of ticks.
    """

    kind: str = "collective"
    message_us: float = 0.0

    def __post_init__(self):
        if self.kind not in ("collective", "point_to_point") or self.message_us < 0:
            raise ScalingError(f"control plane {self.kind!r}, {self.message_us} us: expected collective "
                               "or point_to_point and a message cost >= 0")


def _cycles(items, cycle_s: float, gpus: int, control: ControlPlane, threshold: Optional[int]):
    """Horovod's background cycle over ``items`` ((ready s, bytes), in order of readiness).

    Yields ``(start s, bytes)`` per allreduce, from the start of backprop (a cycle starts
    there). Each cycle takes what is ready at its start and packs it, in order, into
    buffers of at most ``threshold`` bytes (a larger tensor goes alone; ``None``: one
    allreduce per item), negotiates (``control``), then queues the buffers on the stream.
    """
    m, others = control.message_us * 1e-6, gpus - 1
    p2p = control.kind == "point_to_point"
    tree = 2 * math.ceil(math.log2(gpus)) * m if gpus > 1 else 0.0
    idle = cycle_s + 2 * others * m if p2p else max(cycle_s, tree)  # a cycle with nothing ready
    t, k = 0.0, 0
    while k < len(items):
        if items[k][0] > t + 1e-12:  # idle cycles until something is ready
            t += math.ceil((items[k][0] - t) / idle - 1e-9) * idle
        buffers: List[int] = []
        while k < len(items) and items[k][0] <= t + 1e-12:
            size = items[k][1]
            if not buffers or threshold is None or buffers[-1] + size > threshold:
                buffers.append(0)
            buffers[-1] += size
            k += 1
        if p2p:  # rank 0: 2 messages in per rank, then each response and DONE out per rank
            for j, nbytes in enumerate(buffers, 1):
                yield t + (2 + j) * others * m, nbytes
            t += (3 + len(buffers)) * others * m + cycle_s
        else:
            for nbytes in buffers:
                yield t + tree, nbytes
            t += max(cycle_s, tree)


def simulate_step(workload: Workload, strategy: str, gpus: int, network: Network, *,
                  dist: Optional[DistributedConfig] = None, algorithm: Optional[str] = None,
                  cycle_groups: bool = False, control: Optional[ControlPlane] = None) -> StepTime:
    """Predicted step time of ``workload`` on ``gpus`` GPUs with ``strategy`` (see the module notes).

    ``dist`` supplies the group budgets (``group_bytes_mib``, ``first_group_bytes_mib``),
    Horovod's fusion (``fusion_threshold_mib``, ``cycle_time_ms``) and ``compression``.
    ``cycle_groups`` also makes explicit groups wait for the next cycle (as Horovod does);
    by default only ``none`` is quantised to cycles. ``control``: Horovod's negotiation per
    cycle (:class:`ControlPlane`; default: free, ticks every ``cycle_time_ms``).
    """
    dist = dist or DistributedConfig()
    if network.max_gpus is not None and gpus > network.max_gpus:
        nodes = f"{network.max_nodes} node{'s' if network.max_nodes != 1 else ''}"
        raise ScalingError(f"{argument('gpus')} {gpus}: more than the machine's {network.max_gpus} GPUs "
                           f"({nodes} x {network.gpus_per_node})")
    wire = 0.5 if dist.compression == "fp16" else 1.0
    overhead = network.allreduce_overhead_us * 1e-6
    backward = workload.backward_s
    end = busy = work = 0.0
    count = 0
    if gpus > 1:
        def reduce(start, nbytes):
            nonlocal end, busy, work, count
            begin = max(start, end)
            transfer = allreduce_seconds(nbytes * wire, gpus, network, algorithm)
            end = begin + overhead + transfer
            busy += overhead + transfer
            work += transfer  # copies and sums; the overhead is waiting (cycle, negotiation)
            count += 1

        groups = plan_groups(workload, strategy, group_bytes=int(dist.group_bytes_mib * 2**20),
                             first_group_bytes=int(dist.first_group_bytes_mib * 2**20))
        cycle_s, control = dist.cycle_time_ms * 1e-3, control or ControlPlane()
        if groups is None:  # Horovod fusion: the gradients in the order they become ready
            ready = workload.ready_times()
            tensors = sorted(((ready[i], b) for i, b in workload.tape_order if b), key=lambda t: t[0])
            allreduces = _cycles(tensors, cycle_s, gpus, control, int(dist.fusion_threshold_mib * 2**20))
        elif cycle_groups:
            allreduces = _cycles([(g.ready_s, g.nbytes) for g in groups], cycle_s, gpus, control, None)
        else:
            allreduces = ((g.ready_s, g.nbytes) for g in groups)
        for start, nbytes in allreduces:
            reduce(start, nbytes)
    # without a communication engine of its own, the reductions' copies and sums are taken
    # from the compute: backprop cannot end before backward + that work
    tail = max(backward, end) if network.comm_overlaps_compute else max(end, backward + work)
    step = workload.forward_s + tail + workload.update_s + workload.other_s
    return StepTime(strategy, gpus, workload.forward_s, backward, workload.update_s, end, busy, count, step)


def predict(workload: Workload, network: Network, gpus: Sequence[int], strategies: Sequence[str] = DEFAULT_STRATEGIES,
            *, dist: Optional[DistributedConfig] = None, algorithm: Optional[str] = None,
            cycle_groups: bool = False, machine: str = "") -> dict:
    """Step time and efficiency ``T(1)/T(N)`` per strategy at each GPU count (JSON-ready).

    Returns ``{"machine", "network", "algorithm", "workload", "settings", "strategies",
    "rows": [{"gpus", "nodes", strategy: {"step_s", "efficiency", "exposed_s",
    "comm_busy_s", "allreduces"}}]}``.
    """
    dist = dist or DistributedConfig()
    check_strategies(strategies)
    rows = []
    for n in gpus:
        if n < 1:
            raise ScalingError(f"{argument('gpus')}: expected positive GPU counts, got {n}")
        row = {"gpus": int(n), "nodes": math.ceil(n / network.gpus_per_node)}
        for s in strategies:
            base = simulate_step(workload, s, 1, network, dist=dist, algorithm=algorithm)
            step = simulate_step(workload, s, int(n), network, dist=dist, algorithm=algorithm,
                                 cycle_groups=cycle_groups)
            row[s] = {"step_s": step.step_s, "efficiency": base.step_s / step.step_s,
                      "exposed_s": step.exposed_s, "comm_busy_s": step.comm_busy_s,
                      "allreduces": step.allreduces}
        rows.append(row)
    planned = {s: (len(g) if (g := plan_groups(workload, s, group_bytes=int(dist.group_bytes_mib * 2**20),
                                                first_group_bytes=int(dist.first_group_bytes_mib * 2**20)))
                   is not None else None) for s in strategies}
    return {
        "machine": machine,
        "network": network.model_dump(),
        "algorithm": (algorithm or network.inter_node.algorithm) if network.inter_node else "none (one node)",
        "workload": {
            "source": workload.source,
            "forward_s": workload.forward_s,
            "backward_s": workload.backward_s,
            "update_s": workload.update_s,
            "other_s": workload.other_s,
            "grad_bytes": workload.grad_bytes,
            "layers": [asdict(layer) for layer in workload.layers],
        },
        "settings": {
            "group_bytes_mib": dist.group_bytes_mib,
            "first_group_bytes_mib": dist.first_group_bytes_mib,
            "fusion_threshold_mib": dist.fusion_threshold_mib,
            "cycle_time_ms": dist.cycle_time_ms,
            "compression": dist.compression,
            "cycle_groups": cycle_groups,
        },
        "strategies": list(strategies),
        "groups": planned,
        "rows": rows,
    }


def format_prediction(prediction: dict) -> str:
    """The table ``stemnet scaling`` prints: rows GPUs, per strategy step time (ms) and efficiency."""
    w, s = prediction["workload"], prediction["settings"]
    strategies = prediction["strategies"]
    groups = ", ".join(
        f"{k} = " + (f"fusion {s['fusion_threshold_mib']:g} MiB / {s['cycle_time_ms']:g} ms cycle" if v is None
                     else f"{v} allreduce{'s' if v != 1 else ''}")
        for k, v in prediction["groups"].items())
    lines = [
        f"{prediction['machine'] or 'machine'}: {prediction['network']['gpus_per_node']} GPUs/node, "
        f"inter-node {prediction['algorithm']}; compute {w['source']}",
        f"per GPU and step: forward {w['forward_s'] * 1e3:.4g} ms, backward {w['backward_s'] * 1e3:.4g} ms, "
        f"update {w['update_s'] * 1e3:.4g} ms; gradients {w['grad_bytes'] / 2**20:.4g} MiB in "
        f"{len(w['layers'])} layers" + (", fp16 compression" if s["compression"] == "fp16" else ""),
        f"groups: {groups}",
    ]
    cell = 19
    head1 = f"{'':>7}  {'':>6}" + "".join(f"  {k:>{cell}}" for k in strategies)
    head2 = f"{'GPUs':>7}  {'nodes':>6}" + "".join(f"  {'step ms':>10} {'eff':>8}" for _ in strategies)
    lines += [head1, head2, "-" * len(head2)]
    for row in prediction["rows"]:
        cells = "".join(f"  {row[k]['step_s'] * 1e3:>10.4g} {row[k]['efficiency']:>8.3f}" for k in strategies)
        lines.append(f"{row['gpus']:>7}  {row['nodes']:>6}{cells}")
    return "\n".join(lines)


def check_strategies(strategies: Sequence[str]) -> None:
    """One-line error for anything but none, layer, graph, count:N (N > 0)."""
    if not strategies:
        raise ScalingError("--strategies: expected at least one of none, layer, graph, count:N")
    for s in strategies:
        if not GROUPING_PATTERN.match(s):
            raise ScalingError(f"strategy {s!r}: expected none, layer, graph or count:N (N > 0)")


def parse_gpus(text: str) -> List[int]:
    """'6,96,1536' -> [6, 96, 1536] (one-line error otherwise)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ScalingError(f"{argument('gpus')} {text}: expected comma-separated positive integers, e.g. 6,96,1536")
    return values


def scaling_report(config_path, machine: str, gpus: Sequence[int], *, input_shape: Sequence[int],
                   output_shape: Optional[Sequence[int]] = None, batch: Optional[int] = None,
                   precision: Optional[str] = None, strategies: Sequence[str] = DEFAULT_STRATEGIES,
                   algorithm: Optional[str] = None, measure: bool = False, repeats: int = 5,
                   cycle_groups: bool = False, overrides: Sequence[str] = ()) -> dict:
    """What ``stemnet scaling`` computes: load the config and machine, build the workload, predict.

    ``batch`` and ``precision`` default to the config's ``train`` section if it has one
    (else 1 and float32); ``distributed`` settings come from the config (or defaults).
    """
    from stemnet.config import load_config

    check_strategies(strategies)
    cfg = load_config(config_path, overrides, require=("model",))
    network = load_network(machine)
    batch = batch or (cfg.train.batch_size if cfg.train is not None else 1)
    precision = precision or (cfg.train.precision if cfg.train is not None else "float32")
    for n in gpus:  # fail on a GPU count the machine lacks before the model is built
        if network.max_gpus is not None and n > network.max_gpus:
            simulate_step(Workload((), 0.0, 0.0), "none", n, network)
    if not measure:
        try:
            network.flop_rate(precision)
        except ProfileError as err:
            raise ScalingError(f"{argument('machine')} {machine}: {err}") from None
    if measure:
        workload = measure_workload(cfg.model, input_shape, output_shape, batch=batch, repeats=repeats,
                                    network=network)
    else:
        rows, tape_order, _ = profile_model(cfg.model, input_shape, output_shape)
        workload = analytic_workload(rows, network, batch=batch, precision=precision, tape_order=tape_order)
    prediction = predict(workload, network, gpus, strategies, dist=cfg.distributed, algorithm=algorithm,
                         cycle_groups=cycle_groups, machine=Path(machine).stem)
    prediction["settings"].update({"batch": batch, "precision": precision if not measure else "float32",
                                   "input_shape": list(input_shape),
                                   "output_shape": list(output_shape) if output_shape else None,
                                   "config": str(config_path)})
    return prediction
