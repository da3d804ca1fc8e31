"""Check the scaling model against published data-parallel scaling results.

``stemnet scaling --validate`` reads every ``configs/scaling/*.yaml``: one published
scaling point each (a model, a GPU count, the efficiency the paper reports), with the
inputs the model needs -- parameters, per-GPU batch and throughput (hence the one-GPU step
time), the machine profile (interconnect) -- and, beside every input, where it comes
from (``sources``) or which assumption fills a hole the paper leaves (``assumptions``).
A figure with neither is refused. The model then predicts the efficiency ``T(1)/T(N)``
(``stemnet.distributed.scaling.simulate_step``) and prints it beside the paper's.

The per-layer structure of a published model is not in its paper: gradients are spread
evenly over ``layers`` layers in backprop order, except a ``head`` (the layers whose
gradients are ready first, e.g. VGG-16's fully connected layers, one entry per layer in
backprop order) given as fractions of parameters and of backward time.

Every published point ran Horovod, so its allreduces go through Horovod's background
cycle as that version did it: ``control_plane`` and ``control_message_us`` describe the
negotiation (``stemnet.distributed.scaling.ControlPlane``), and explicit groups wait for
the cycle too (``cycle_groups``). One GPU reduces nothing: T(1) has no cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stemnet.config import DistributedConfig, PositiveFloat, PositiveInt, validation_error
from stemnet.errors import UserError
from stemnet.shipped import shipped_dir

SCALING_DIR = shipped_dir("configs") / "scaling"
NEEDS_SOURCE = ("gpus", "published_efficiency", "params", "batch_per_gpu", "samples_per_s_per_gpu",
                "machine", "backward_fraction", "layers", "grad_bytes_per_param", "update_bytes_per_param",
                "strategy", "control_plane", "control_message_us")


class Head(BaseModel):
    """The layers first in backprop order, as fractions of all parameters and of backward time."""

    model_config = ConfigDict(extra="forbid")
    params_fraction: float = Field(gt=0, lt=1)
    backward_fraction: float = Field(gt=0, lt=1)


class PublishedPoint(BaseModel):
    """One published scaling point and the model's inputs for it (``configs/scaling/*.yaml``)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    reference: str
    gpus: PositiveInt
    published_efficiency: float = Field(gt=0, le=1)
    machine: str  # a profile name, or a path relative to this file
    params: PositiveInt
    batch_per_gpu: PositiveInt
    samples_per_s_per_gpu: PositiveFloat  # at one GPU (or as close to it as the paper gives)
    backward_fraction: float = Field(2 / 3, gt=0, lt=1)  # of the one-GPU step
    layers: PositiveInt = 100
    head: Optional[Union[Head, List[Head]]] = None  # one layer, or several in backprop order
    grad_bytes_per_param: Literal[2, 4] = 4  # float32 gradients, or fp16 (compressed or fp16 training)
    update_bytes_per_param: PositiveInt = 28  # optimizer memory traffic: Adam 28, momentum SGD 20, SGD 12
    strategy: str = "none"
    distributed: Dict[str, float] = Field(default_factory=dict)  # DistributedConfig fields
    control_plane: Literal["collective", "point_to_point"] = "collective"  # Horovod's negotiation
    control_message_us: float = Field(0.0, ge=0)  # one control message at the coordinator (µs)
    cycle_groups: bool = True  # explicit groups wait for Horovod's cycle, as in Horovod
    sources: Dict[str, str]
    assumptions: Dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _every_figure_has_a_source(self):
        for key in NEEDS_SOURCE + tuple(f"distributed.{k}" for k in self.distributed) + (
                ("head",) if self.head else ()):
            if key not in self.sources and key not in self.assumptions:
                raise ValueError(f"{key}: no source; expected an entry in sources or assumptions")
        heads = [self.head] if isinstance(self.head, Head) else list(self.head or [])
        if heads and (len(heads) >= self.layers or sum(h.params_fraction for h in heads) >= 1
                      or sum(h.backward_fraction for h in heads) >= 1):
            raise ValueError("head: expected fewer head layers than layers, fractions summing below 1")
        return self

    @property
    def step_s(self) -> float:
        return self.batch_per_gpu / self.samples_per_s_per_gpu


def load_point(path: Path) -> PublishedPoint:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: YAML syntax error: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("published"), dict):
        raise UserError(f"{path}: published: missing section; expected a 'published:' mapping")
    try:
        return PublishedPoint.model_validate(data["published"])
    except ValidationError as err:
        raise validation_error(err, str(path), root=PublishedPoint, prefix=("published",)) from None


def workload_of(point: PublishedPoint, network):
    """The per-GPU workload: the one-GPU step split into forward, backward (by layer), update."""
    from stemnet.distributed.workload import LayerCost, Workload

    update = point.params * point.update_bytes_per_param / (network.memory_bandwidth_gbs * 1e9)
    backward = point.step_s * point.backward_fraction
    forward = max(point.step_s - backward - update, 0.0)
    grad = point.params * point.grad_bytes_per_param
    layers: List = []
    body_bytes, body_bwd, n = grad, backward, point.layers
    heads = [point.head] if isinstance(point.head, Head) else list(point.head or [])
    for k, head in enumerate(heads):
        layers.append(LayerCost(f"head{k}", int(grad * head.params_fraction), backward * head.backward_fraction))
        body_bytes -= layers[-1].grad_bytes
        body_bwd -= layers[-1].backward_s
        n -= 1
    layers += [LayerCost(f"layer{i}", int(body_bytes / n), body_bwd / n) for i in range(n)]
    return Workload(tuple(layers), forward, update, source=f"published: {point.reference}")


def validate_point(point: PublishedPoint, where: Path) -> dict:
    from stemnet.distributed.scaling import ControlPlane, simulate_step
    from stemnet.hpc.machines import load_network

    machine = point.machine
    if machine.endswith((".yaml", ".yml")):
        machine = str((where.parent / machine).resolve())
    network = load_network(machine)
    work = workload_of(point, network)
    dist = DistributedConfig(**{"grouping": point.strategy, **point.distributed})
    control = ControlPlane(point.control_plane, point.control_message_us)
    one, many = (simulate_step(work, point.strategy, n, network, dist=dist, control=control,
                               cycle_groups=point.cycle_groups) for n in (1, point.gpus))
    model = one.step_s / many.step_s
    return {"name": point.name, "reference": point.reference, "gpus": point.gpus, "machine": Path(machine).stem,
            "published": point.published_efficiency, "model": model,
            "points_off": 100 * (model - point.published_efficiency),
            "step_1_s": one.step_s, "step_n_s": many.step_s, "exposed_comm_s": many.exposed_s,
            "comm_busy_s": many.comm_busy_s, "allreduces": many.allreduces, "grad_mib": work.grad_bytes / 2**20,
            "assumptions": point.assumptions, "sources": point.sources}


def validate_published(folder: Path = SCALING_DIR) -> dict:
    """Every published point in ``folder``: model against paper (JSON-ready)."""
    paths = sorted(Path(folder).glob("*.yaml"))
    if not paths:
        raise UserError(f"{folder}: no published scaling points (*.yaml)")
    rows = [validate_point(load_point(p), p) for p in paths]
    return {"points": rows, "within_3_points": sum(abs(r["points_off"]) <= 3 for r in rows), "total": len(rows)}


def format_validation(result: dict) -> str:
    lines = [f"{'published point':<34} {'GPUs':>6} {'paper':>6} {'model':>6} {'off':>6}  step 1 GPU / N GPUs, "
             "exposed communication"]
    for r in result["points"]:
        lines.append(f"{r['name']:<34} {r['gpus']:>6} {r['published']:>6.3f} {r['model']:>6.3f} "
                     f"{r['points_off']:>+6.1f}  {r['step_1_s'] * 1e3:.0f} / {r['step_n_s'] * 1e3:.0f} ms, "
                     f"{r['exposed_comm_s'] * 1e3:.1f} ms ({r['grad_mib']:.0f} MiB of gradients in "
                     f"{r['allreduces']} allreduces)")
    lines.append(f"{result['within_3_points']} of {result['total']} within 3 points of the paper")
    for r in result["points"]:
        for key, text in r["assumptions"].items():
            lines.append(f"  assumption ({r['name']}, {key}): {text}")
    return "\n".join(lines)
