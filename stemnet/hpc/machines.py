"""Machine profiles: the one loader of ``configs/machines/{name}.yaml`` (or any YAML path).

A profile has two sections, both typed here and read through :func:`load_profile`:

- ``machine:`` (:class:`Machine`): scheduler, launcher, node geometry, walltime limits,
  software set-up -- what ``stemnet submit`` renders job scripts from;
- ``network:`` (:class:`Network`): peak FLOP rates, memory bandwidth and the α-β figures
  of the links -- what the scaling model (``stemnet scaling``) prices allreduces with.

Public API
----------
Machine, WalltimeLimit, Network, Link, InterNodeLink, Profile
load_profile(name_or_path, require) -> Profile; load_machine(...) -> Machine; load_network(...) -> Network
machine_names() -> list; profile_path(name_or_path) -> Path
parse_walltime("HH:MM") -> minutes; format_walltime(minutes) -> "HH:MM"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stemnet.config import NonNegativeFloat, PositiveFloat, PositiveInt, validation_error
from stemnet.errors import UserError, argument
from stemnet.hpc import MACHINES_DIR, machine_names  # noqa: F401  (public here too)

SECTIONS = ("machine", "network")
# Per scheduler: the launchers it goes with.
LAUNCHERS = {"lsf": ("jsrun",), "slurm": ("srun",), "local": ("horovodrun", "mpirun")}
PRECISION_PEAK = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}

_WALLTIME = re.compile(r"^(\d{1,3}):([0-5]\d)$")


class ProfileError(UserError, ValueError):
    """A bad machine profile or machine request, as one line."""


# =============================================================================== walltime
def parse_walltime(text: str, where: str = argument("walltime")) -> int:
    """``"HH:MM"`` -> minutes (> 0); a one-line :class:`UserError` otherwise."""
    match = _WALLTIME.match(str(text).strip())
    if not match:
        raise UserError(f"{where} {text}: expected HH:MM, e.g. 02:00")
    minutes = int(match.group(1)) * 60 + int(match.group(2))
    if minutes <= 0:
        raise UserError(f"{where} {text}: expected a walltime longer than 00:00")
    return minutes


def format_walltime(minutes: int) -> str:
    """Minutes -> ``"HH:MM"``."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _walltime_field(value):
    if value is not None and not _WALLTIME.match(str(value)):
        raise ValueError(f"expected HH:MM, got {value!r}")
    return value


# ======================================================================== machine section
class WalltimeLimit(BaseModel):
    """Jobs of up to ``max_nodes`` nodes may run at most ``walltime`` (HH:MM)."""

    model_config = ConfigDict(extra="forbid")
    max_nodes: PositiveInt
    walltime: str

    @field_validator("walltime")
    @classmethod
    def _hhmm(cls, value):
        return _walltime_field(value)


class Machine(BaseModel):
    """The ``machine:`` section of a profile: scheduler, launcher and node facts.

    Geometry: ``ranks_per_node`` ranks per node, each bound to ``cores_per_rank``
    physical cores and ``gpus_per_node / ranks_per_node`` GPUs. ``threads_per_core`` is
    how many CPUs the launcher counts per core (``srun -c`` = cores_per_rank ×
    threads_per_core: 2 on Perlmutter, 1 on Frontier; jsrun counts cores).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    scheduler: Literal["lsf", "slurm", "local"]
    launcher: Literal["jsrun", "srun", "mpirun", "horovodrun"]
    gpus_per_node: int = Field(ge=0)
    cores_per_node: PositiveInt
    ranks_per_node: PositiveInt
    cores_per_rank: PositiveInt
    threads_per_core: PositiveInt = 1
    max_nodes: PositiveInt
    max_walltime: Optional[str] = None
    walltime_limits: List[WalltimeLimit] = Field(default_factory=list)
    queue: Optional[str] = None  # LSF -q
    partition: Optional[str] = None  # Slurm -p
    qos: Optional[str] = None  # Slurm -q
    constraint: Optional[str] = None  # Slurm -C
    alloc_flags: Optional[str] = None  # LSF -alloc_flags
    directives: List[str] = Field(default_factory=list)  # more scheduler options, one each
    launcher_flags: List[str] = Field(default_factory=list)  # appended to the rank launch
    modules: List[str] = Field(default_factory=list)
    env: Dict[str, str] = Field(default_factory=dict)
    activate: str = "source {venv}/bin/activate"
    staging_path: Optional[str] = None
    signal_minutes: PositiveInt = 10
    # the training backend its jobs use: mwms where Horovod does not build (Frontier, ROCm 6),
    # auto (the install's default) elsewhere; a config's own distributed.backend wins
    backend: Literal["auto", "horovod", "mwms"] = "auto"

    @field_validator("max_walltime")
    @classmethod
    def _hhmm(cls, value):
        return _walltime_field(value)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value):
        for key in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"env: {key!r} is not a shell variable name")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.launcher not in LAUNCHERS[self.scheduler]:
            raise ValueError(
                f"launcher: {self.launcher!r} does not go with scheduler {self.scheduler!r}; "
                f"expected {' or '.join(LAUNCHERS[self.scheduler])}"
            )
        used = self.ranks_per_node * self.cores_per_rank
        if used > self.cores_per_node:
            raise ValueError(
                f"cores_per_rank: {self.ranks_per_node} ranks x {self.cores_per_rank} cores = {used} "
                f"is more than cores_per_node {self.cores_per_node}"
            )
        if self.gpus_per_node % self.ranks_per_node:
            raise ValueError(
                f"ranks_per_node: {self.gpus_per_node} GPUs do not split evenly over "
                f"{self.ranks_per_node} ranks; expected a divisor of gpus_per_node"
            )
        if self.scheduler == "local" and self.max_nodes != 1:
            raise ValueError("max_nodes: a local machine is one node; expected 1")
        limits = self.walltime_limits
        if [lim.max_nodes for lim in limits] != sorted({lim.max_nodes for lim in limits}):
            raise ValueError("walltime_limits: expected max_nodes strictly increasing")
        return self

    @property
    def gpus_per_rank(self) -> int:
        return self.gpus_per_node // self.ranks_per_node

    def walltime_limit(self, nodes: int) -> Optional[int]:
        """The longest walltime (minutes) a job of ``nodes`` nodes may ask for, or None."""
        limit = parse_walltime(self.max_walltime) if self.max_walltime else None
        for lim in self.walltime_limits:
            if nodes <= lim.max_nodes:
                bin_limit = parse_walltime(lim.walltime)
                return bin_limit if limit is None else min(limit, bin_limit)
        return limit


# ======================================================================== network section
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Link(_Strict):
    """One level of the network: bandwidth per direction (GB/s = 1e9 B/s), latency per step (µs)."""

    bandwidth_gbs: PositiveFloat
    latency_us: NonNegativeFloat


class InterNodeLink(Link):
    """The network between nodes: ``bandwidth_gbs`` is the injection bandwidth per node.

    ``algorithm``: ``tree`` or ``ring`` across nodes after a ring inside each node
    (hierarchical), or ``flat``: one ring through every GPU (NCCL rings without a
    hierarchy), ``2(N-1)`` steps at this latency, bytes at the slowest link it crosses.
    """

    algorithm: Literal["ring", "tree", "flat"] = "tree"


class Network(_Strict):
    """The ``network:`` section: compute and interconnect figures for the scaling model."""

    description: str = ""
    gpus_per_node: PositiveInt
    max_nodes: Optional[PositiveInt] = None
    peak_tflops: Dict[Literal["float32", "float16", "bfloat16"], PositiveFloat] = Field(min_length=1)
    compute_efficiency: float = Field(gt=0, le=1)
    memory_bandwidth_gbs: PositiveFloat
    intra_node: Link
    inter_node: Optional[InterNodeLink] = None
    allreduce_overhead_us: NonNegativeFloat = 0.0
    # False where the reduction runs on the cores that compute (CPU ranks with Gloo: the
    # copies and sums of an allreduce take the rank's core from backprop); True for GPUs,
    # whose NCCL stream and NIC run beside the compute kernels.
    comm_overlaps_compute: bool = True
    calibration: Dict[str, str] = Field(default_factory=dict)  # how the figures were obtained

    @model_validator(mode="after")
    def _inter_node_needed(self):
        if self.inter_node is None and self.max_nodes != 1:
            raise ValueError("inter_node: missing; expected an inter_node link unless max_nodes is 1")
        return self

    @property
    def max_gpus(self) -> Optional[int]:
        return None if self.max_nodes is None else self.max_nodes * self.gpus_per_node

    def flop_rate(self, precision: str = "float32") -> float:
        """Sustained FLOP/s of one GPU for a training ``precision`` (peak × efficiency)."""
        key = PRECISION_PEAK.get(precision, precision)
        if key not in self.peak_tflops:
            raise ProfileError(f"network.peak_tflops: no {key!r} entry for precision {precision!r}; "
                               f"expected one of {sorted(self.peak_tflops)}")
        return self.peak_tflops[key] * 1e12 * self.compute_efficiency


# ================================================================================= loader
class Profile(BaseModel):
    """A loaded profile: the sections asked for (the others, if present, unvalidated)."""

    path: Path
    machine: Optional[Machine] = None
    network: Optional[Network] = None


def profile_path(name_or_path: Union[str, Path]) -> Path:
    """A shipped profile by name, or a YAML file by path; one-line error if neither."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"{argument('machine')} {text}: no such profile file")
        return path
    path = MACHINES_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ProfileError(f"{argument('machine')} {text}: unknown machine; expected one of {', '.join(machine_names())} "
                           "or a path to a YAML profile")
    return path


def load_profile(name_or_path: Union[str, Path], require: Sequence[str] = SECTIONS) -> Profile:
    """Read a profile and validate the sections in ``require`` (each must be present)."""
    path = profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: YAML syntax error: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with 'machine:' and/or 'network:' sections")
    for key in data:
        if key not in SECTIONS:
            raise ProfileError(f"{path}: {key}: unknown key; expected one of {', '.join(SECTIONS)}")
    sections = {}
    for name in require:
        model = {"machine": Machine, "network": Network}[name]
        if not isinstance(data.get(name), dict):
            raise ProfileError(f"{path}: {name}: missing section; expected a '{name}:' mapping")
        try:
            sections[name] = model.model_validate(data[name])
        except ValidationError as err:
            raise ProfileError(str(validation_error(err, str(path), root=model, prefix=(name,)))) from None
    return Profile(path=path, **sections)


def load_machine(name_or_path: Union[str, Path]) -> Machine:
    """The ``machine:`` section of a profile (what ``stemnet submit`` reads)."""
    return load_profile(name_or_path, ("machine",)).machine


def load_network(name_or_path: Union[str, Path]) -> Network:
    """The ``network:`` section of a profile (what the scaling model reads)."""
    return load_profile(name_or_path, ("network",)).network
