"""Batch jobs: render a scheduler script from the templates in ``jobs/`` and submit it.

``stemnet submit {simulate|train} --machine M --nodes N --walltime HH:MM --project P
--config FILE --out DIR`` checks everything it can on the login node (machine profile,
node count, walltime against the machine's limits, project, the config), writes
``DIR/jobs/{task}-{time}.sh`` (plus ``{task}-{time}.yaml``, the config resolved and
frozen for every job of the chain), then submits it with ``bsub`` (LSF) or ``sbatch``
(Slurm), or runs it in the foreground (``scheduler: local``). ``--chain K`` submits the
same script K times, each job depending on the previous one ending; a training run
resumes from its last checkpoint in every job, a simulation resumes its shards.

A machine is a YAML profile ``configs/machines/{name}.yaml`` (or any path) with a
``machine:`` section validated by :class:`Machine`; a ``network:`` section, if present,
belongs to the scaling model and is not read here.

A script is three templates rendered with the same values and joined:
``jobs/{scheduler}.sh`` (directives), ``jobs/setup.sh`` (modules, environment, paths,
Horovod settings) and ``jobs/{task}.sh`` (the steps). Placeholders are ``{{name}}``;
everything else is plain bash. See ``jobs/README.md``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stemnet.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MACHINES_DIR = REPO / "configs" / "machines"
TEMPLATES_DIR = REPO / "jobs"
TASKS = ("simulate", "train")
SECTIONS_NEEDED = {"simulate": ("simulation",), "train": ("model", "train")}

# Per launcher: the environment variables from which every rank reads its rank and world.
RANK_VARIABLES = {
    "jsrun": ("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE"),
    "srun": ("SLURM_PROCID", "SLURM_NTASKS"),
    "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    "horovodrun": ("HOROVOD_RANK", "HOROVOD_SIZE"),
}
# Per scheduler: the launchers it goes with, the job id inside the job, the submit command.
LAUNCHERS = {"lsf": ("jsrun",), "slurm": ("srun",), "local": ("horovodrun", "mpirun")}
JOB_ID_VARIABLE = {"lsf": "$LSB_JOBID", "slurm": "$SLURM_JOB_ID", "local": "$$"}
SUBMIT_COMMAND = {"lsf": "bsub", "slurm": "sbatch"}

_WALLTIME = re.compile(r"^(\d{1,3}):([0-5]\d)$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%,:=-]+$")  # usable unquoted in a #BSUB/#SBATCH line
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# =============================================================================== walltime
def parse_walltime(text: str, where: str = "--walltime") -> int:
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


# ========================================================================= machine profile
def _walltime_field(value):
    if value is not None and not _WALLTIME.match(str(value)):
        raise ValueError(f"expected HH:MM, got {value!r}")
    return value


class WalltimeLimit(BaseModel):
    """Jobs of up to ``max_nodes`` nodes may run at most ``walltime`` (HH:MM)."""

    model_config = ConfigDict(extra="forbid")
    max_nodes: int = Field(gt=0)
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
    cores_per_node: int = Field(gt=0)
    ranks_per_node: int = Field(gt=0)
    cores_per_rank: int = Field(gt=0)
    threads_per_core: int = Field(1, gt=0)
    max_nodes: int = Field(gt=0)
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
    signal_minutes: int = Field(10, gt=0)

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


class MachineFile(BaseModel):
    """A profile file: ``machine:`` (read here) and ``network:`` (for the scaling model)."""

    model_config = ConfigDict(extra="forbid")
    machine: Machine
    network: Optional[Dict[str, Any]] = None


def machine_names() -> List[str]:
    """Names of the profiles in ``configs/machines``."""
    return sorted(p.stem for p in MACHINES_DIR.glob("*.yaml"))


def _profile_error(err: ValidationError, where: str) -> UserError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        model = Machine if first["loc"][:1] == ("machine",) and len(first["loc"]) == 2 else None
        known = ", ".join(sorted(model.model_fields)) if model else "machine, network"
        message = f"unknown key; expected one of {known}"
    elif first["type"] == "missing":
        message = "missing required key"
    else:
        message = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        if first["type"] != "value_error" and not isinstance(given, (dict, list)):
            message += f", got {given!r}"
    return UserError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def load_machine(name: str | Path) -> Machine:
    """A profile by name (``configs/machines/{name}.yaml``) or by path to a YAML file."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise UserError(f"--machine {text}: no such profile file")
    else:
        path = MACHINES_DIR / f"{text}.yaml"
        if not path.is_file():
            raise UserError(
                f"--machine {text}: unknown machine; expected one of {', '.join(machine_names())} "
                "or a path to a YAML profile"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: YAML syntax error: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with a 'machine:' section")
    try:
        return MachineFile.model_validate(data).machine
    except ValidationError as err:
        raise _profile_error(err, str(path)) from None


# ================================================================================ launcher
def launch_command(machine: Machine, nodes: int, *, per_node: bool = False) -> List[str]:
    """The launcher prefix that starts every rank (or, ``per_node``, one task per node).

    jsrun (LSF, Summit): one resource set per rank, ``-n`` = nodes × ranks_per_node
    resource sets, ``-a 1`` task, ``-c`` cores and ``-g`` GPUs each, ``-r`` sets per
    node, ``-b packed:c`` binding the task to its c cores. srun: ``-N`` nodes, ``-n``
    ranks, ``--ntasks-per-node``, ``-c`` CPUs per task, ``--gpus-per-task``.
    """
    rpn = 1 if per_node else machine.ranks_per_node
    cores = 1 if per_node else machine.cores_per_rank
    gpus = 0 if per_node else machine.gpus_per_rank
    flags = [] if per_node else list(machine.launcher_flags)
    n = nodes * rpn
    if machine.launcher == "jsrun":
        cmd = ["jsrun", "-n", n, "-a", 1, "-c", cores, "-g", gpus, "-r", rpn, "-b", f"packed:{cores}"]
    elif machine.launcher == "srun":
        cmd = ["srun", "-N", nodes, "-n", n, f"--ntasks-per-node={rpn}", "-c", cores * machine.threads_per_core]
        if gpus:
            cmd.append(f"--gpus-per-task={gpus}")
    elif machine.launcher == "mpirun":
        cmd = ["mpirun", "-np", n, "--map-by", f"ppr:{rpn}:node:PE={cores}", "--bind-to", "core"]
    else:  # horovodrun: one node (scheduler local)
        cmd = ["horovodrun", "-np", n, "-H", f"localhost:{n}", "--gloo"]
    return [str(c) for c in cmd] + flags


# ============================================================================== rendering
def render_template(text: str, values: Dict[str, str], where: str = "template") -> str:
    """Replace every ``{{name}}`` by ``values[name]``; an unknown name is an error."""

    def replace(match):
        key = match.group(1)
        if key not in values:
            raise UserError(f"{where}: unknown placeholder {{{{{key}}}}}; expected one of {', '.join(sorted(values))}")
        return values[key]

    return _PLACEHOLDER.sub(replace, text)


def _shell_value(value: str) -> str:
    """A double-quoted shell word: ``$VARS`` expand in the job, nothing else does."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", str(value)) + '"'


def _directive_path(path: Path, option: str) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise UserError(f"{option} {text}: the path is used in a scheduler directive; expected no spaces or quotes")
    return text


@dataclass
class Job:
    """A validated request: everything the templates need, nothing submitted yet."""

    task: str
    machine: Machine
    nodes: int
    walltime_min: Optional[int]
    project: Optional[str]
    config: Any  # stemnet.config.Config
    config_path: Path
    out: Path
    data: Optional[Path] = None
    chain: int = 1
    overrides: Sequence[str] = ()

    @property
    def ranks(self) -> int:
        return self.nodes * self.machine.ranks_per_node

    @property
    def job_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"stemnet-{self.task}-{self.out.name}")[:64]


def build_job(
    task: str,
    *,
    machine: str | Path | Machine,
    nodes: int,
    walltime: Optional[str],
    project: Optional[str],
    config: str | Path,
    out: str | Path,
    data: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    chain: int = 1,
) -> Job:
    """Check a request (one-line :class:`UserError` for any bad input) and return the job.

    Checks, in order: task, machine profile, nodes (1..max_nodes), walltime (HH:MM,
    within the machine's limit for that node count; more than the checkpoint-signal
    window for training), project (LSF/Slurm), config (validated with the sections the
    task needs), --data (train: a dataset with a manifest; simulate: not allowed), chain.
    """
    from stemnet.config import load_config

    if task not in TASKS:
        raise UserError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    m = machine if isinstance(machine, Machine) else load_machine(machine)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes <= 0:
        raise UserError(f"--nodes {nodes}: expected a positive number of nodes")
    if "{venv}" in m.activate and not (Path(sys.prefix) / "bin" / "activate").is_file():
        raise UserError(
            f"--machine {m.name}: its activate line uses {{venv}}, but {sys.prefix} (where stemnet submit "
            "runs) has no bin/activate; run from the job's virtual environment or set activate in the profile"
        )
    if nodes > m.max_nodes:
        raise UserError(f"--nodes {nodes}: {m.name} has at most {m.max_nodes} node(s) per job")
    minutes = None
    if walltime is None or str(walltime).strip() == "":
        if m.scheduler != "local":
            raise UserError(f"--walltime: required on {m.name} ({m.scheduler}); expected HH:MM")
    else:
        minutes = parse_walltime(walltime)
        limit = m.walltime_limit(nodes)
        if limit is not None and minutes > limit:
            raise UserError(
                f"--walltime {walltime}: {m.name} allows at most {format_walltime(limit)} "
                f"for a job of {nodes} node(s)"
            )
        if task == "train" and m.scheduler != "local" and minutes <= m.signal_minutes:
            raise UserError(
                f"--walltime {walltime}: expected more than the {m.signal_minutes} minutes "
                "reserved for the checkpoint signal before the walltime kill"
            )
    if m.scheduler != "local":
        if not project or not str(project).strip():
            option = "-P" if m.scheduler == "lsf" else "-A"
            raise UserError(f"--project: required on {m.name} (the allocation to charge, {m.scheduler} {option})")
        if not re.match(r"^[A-Za-z0-9_.-]+$", str(project)):
            raise UserError(f"--project {project}: expected letters, digits, '_', '.' or '-'")
    cfg = load_config(config, overrides, require=SECTIONS_NEEDED[task])
    out_path = Path(out).expanduser().resolve()
    _directive_path(out_path, "--out")
    data_path = None
    if task == "simulate":
        if data is not None:
            raise UserError("--data: only for `submit train`; a simulation writes its dataset to --out")
    else:
        if data is None:
            raise UserError("--data: required for `submit train`; expected a dataset folder written by `stemnet simulate`")
        data_path = Path(data).expanduser().resolve()
        if not (data_path / "manifest.json").is_file():
            raise UserError(f"--data {data}: no manifest.json; expected a finished dataset (stemnet simulate, then --finalize)")
        if data_path == out_path:
            raise UserError(f"--out {out}: the run folder is the dataset; expected another folder")
    if not isinstance(chain, int) or isinstance(chain, bool) or chain < 1:
        raise UserError(f"--chain {chain}: expected a positive number of jobs")
    return Job(task, m, nodes, minutes, project, cfg, Path(config).resolve(), out_path, data_path, chain, tuple(overrides))


def _directives(job: Job, log_prefix: str) -> List[str]:
    m = job.machine
    if m.scheduler == "lsf":
        lines = [
            f"-P {job.project}",
            f"-W {format_walltime(job.walltime_min)}",
            f"-nnodes {job.nodes}",
            f"-J {job.job_name}",
            f"-o {log_prefix}.%J.out",
            f"-e {log_prefix}.%J.err",
        ]
        if m.queue:
            lines.append(f"-q {m.queue}")
        if m.alloc_flags:
            lines.append(f'-alloc_flags "{m.alloc_flags}"')
        if job.task == "train":  # SIGUSR2 signal_minutes before the kill: the trainer checkpoints
            lines += ["-wa USR2", f"-wt {m.signal_minutes}"]
        return ["#BSUB " + line for line in lines + m.directives]
    if m.scheduler == "slurm":
        lines = [
            f"-A {job.project}",
            f"-t {format_walltime(job.walltime_min)}:00",
            f"-N {job.nodes}",
            f"-J {job.job_name}",
            f"-o {log_prefix}.%j.out",
            f"-e {log_prefix}.%j.err",
        ]
        lines += [f"{flag} {value}" for flag, value in (("-p", m.partition), ("-q", m.qos), ("-C", m.constraint)) if value]
        if job.task == "train":  # to every job step (not the batch shell): the trainer checkpoints
            lines.append(f"--signal=USR2@{m.signal_minutes * 60}")
        return ["#SBATCH " + line for line in lines + m.directives]
    return [f"# local job: no scheduler; walltime {format_walltime(job.walltime_min) if job.walltime_min else 'not limited'}"]


def script_values(job: Job, config_file: Path, log_prefix: str) -> Dict[str, str]:
    """The template values for ``job`` (its frozen config at ``config_file``)."""
    from stemnet.distributed.runtime import horovod_environment

    m = job.machine
    rank_var, size_var = RANK_VARIABLES[m.launcher]
    launch = shlex.join(launch_command(m, job.nodes))
    venv = shlex.quote(sys.prefix)
    gpus = f"{m.gpus_per_rank} GPU, " if m.gpus_per_rank else ""
    threads = f" ({m.threads_per_core} hardware threads each)" if m.threads_per_core > 1 else ""
    staging = bool(m.staging_path) and job.task == "train"
    paths = {"STEMNET_CONFIG": shlex.quote(str(config_file))}
    if job.task == "train":
        paths["STEMNET_DATA"] = shlex.quote(str(job.data))
        paths["STEMNET_RUN"] = shlex.quote(str(job.out))
    else:
        paths["STEMNET_DATA"] = shlex.quote(str(job.out))
    if staging:
        paths["STEMNET_STAGE"] = _shell_value(f"{m.staging_path.rstrip('/')}/stemnet-$JOB_ID")
        paths["STEMNET_LOCAL_OUT"] = '"$STEMNET_STAGE/out"'
    paths["OMP_NUM_THREADS"] = str(m.cores_per_rank)
    horovod = horovod_environment(job.config.distributed) if job.task == "train" else {}
    env_lines = [f"export {k}={_shell_value(v)}" for k, v in m.env.items()]
    rank, size = f"${rank_var}", f"${size_var}"
    if staging:
        stage_step = (
            f"echo \"stemnet: staging $STEMNET_DATA to $STEMNET_STAGE/rank<r> on every node\"\n"
            f"{launch} bash -c 'exec stemnet stage \"$STEMNET_DATA\" --to \"$STEMNET_STAGE/rank{rank}\" "
            f"--rank \"{rank}\" --world \"{size}\"' \\\n"
            f"  || {{ echo \"stemnet: staging failed; not training\" >&2; exit 1; }}"
        )
        train_data = f"$STEMNET_STAGE/rank{rank}"
        per_node = shlex.join(launch_command(m, job.nodes, per_node=True))
        copy_back = (
            f"{per_node} bash -c 'if [ -d \"$STEMNET_LOCAL_OUT\" ]; then "
            f"dest=\"$STEMNET_RUN/node-out/$(hostname)\"; mkdir -p \"$dest\" && cp -r \"$STEMNET_LOCAL_OUT/.\" \"$dest/\"; fi' \\\n"
            f"  || echo \"stemnet: copy-back of node-local outputs failed\" >&2"
        )
    else:
        stage_step = f"# (no node-local staging on {m.name}: staging_path is not set; every rank reads $STEMNET_DATA in place)"
        train_data = "$STEMNET_DATA"
        copy_back = "# (nothing node-local to copy back: no staging on this machine)"
    return {
        "task": job.task,
        "machine": m.name,
        "scheduler": m.scheduler,
        "nodes": str(job.nodes),
        "ranks": str(job.ranks),
        "job_name": job.job_name,
        "directives": "\n".join(_directives(job, log_prefix)),
        "geometry": (
            f"{job.nodes} node(s) x {m.ranks_per_node} ranks = {job.ranks} ranks; each rank {gpus}"
            f"{m.cores_per_rank} cores{threads}"
        ),
        "chain": str(job.chain),
        "job_id": JOB_ID_VARIABLE[m.scheduler],
        "modules": "\n".join(f"module load {shlex.quote(mod)}" for mod in m.modules) or "# (no modules)",
        "machine_env": "\n".join(env_lines) or "# (no machine environment)",
        "activate": m.activate.replace("{venv}", venv) or "# (no activation: stemnet is on PATH)",
        "paths": "\n".join(f"export {k}={v}" for k, v in paths.items()),
        "horovod_env": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in horovod.items())
        or "# (no Horovod: simulation ranks do not communicate)",
        "launch": launch,
        "rank": rank,
        "world": size,
        "stage_step": stage_step,
        "train_data": train_data,
        "copy_back": copy_back,
    }


def render_script(job: Job, config_file: Path, log_prefix: Optional[str] = None) -> str:
    """The batch script: ``jobs/{scheduler}.sh`` + ``jobs/setup.sh`` + ``jobs/{task}.sh``."""
    if log_prefix is None:
        log_prefix = _directive_path(job.out / "jobs" / job.task, "--out")
    values = script_values(job, config_file, log_prefix)
    parts = []
    for name in (f"{job.machine.scheduler}.sh", "setup.sh", f"{job.task}.sh"):
        path = TEMPLATES_DIR / name
        if not path.is_file():
            raise UserError(f"{path}: no such job template")
        parts.append(render_template(path.read_text(), values, str(path)).rstrip("\n"))
    return "\n\n".join(parts) + "\n"


def write_job(job: Job, stamp: Optional[str] = None) -> Path:
    """Write ``OUT/jobs/{task}-{stamp}.yaml`` (frozen config) and ``.sh``; return the script."""
    from stemnet.config import to_yaml

    jobs_dir = job.out / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base, k = f"{job.task}-{stamp}", 1
    while (jobs_dir / f"{base}.sh").exists():
        k += 1
        base = f"{job.task}-{stamp}-{k}"
    config_file = jobs_dir / f"{base}.yaml"
    header = f"# {job.config_path}, resolved by `stemnet submit`" + (
        f" with -o {' -o '.join(job.overrides)}" if job.overrides else "") + "\n"
    config_file.write_text(header + to_yaml(job.config))
    script = jobs_dir / f"{base}.sh"
    script.write_text(render_script(job, config_file))
    script.chmod(0o755)
    return script


# ============================================================================= submission
def parse_job_id(scheduler: str, output: str) -> Optional[str]:
    """The job id in ``bsub`` / ``sbatch`` output, or None."""
    if scheduler == "lsf":
        match = re.search(r"Job <(\d+)> is submitted", output)
    else:
        match = re.search(r"Submitted batch job (\d+)", output) or re.search(r"^\s*(\d+)(;\S*)?\s*$", output, re.M)
    return match.group(1) if match else None


def dependency_args(scheduler: str, previous: Optional[str]) -> List[str]:
    """Options making a job wait for ``previous`` to end (whatever its exit status)."""
    if previous is None:
        return []
    if scheduler == "lsf":
        return ["-w", f"ended({previous})"]
    return [f"--dependency=afterany:{previous}"]


def submit_commands(scheduler: str, script: Path, previous: Optional[str]) -> List[str]:
    """The argv that submits ``script`` (LSF reads it from stdin so #BSUB lines count)."""
    cmd = SUBMIT_COMMAND[scheduler]
    return [cmd, *dependency_args(scheduler, previous)] + ([] if scheduler == "lsf" else [str(script)])


def _first_line(*texts: str) -> str:
    for text in texts:
        for line in (text or "").splitlines():
            if line.strip():
                return line.strip()
    return "no message"


def submit_script(job: Job, script: Path, run: Callable = subprocess.run) -> List[str]:
    """Submit ``script`` ``job.chain`` times, each after the previous; return the job ids."""
    scheduler = job.machine.scheduler
    ids: List[str] = []
    previous = None
    for i in range(1, job.chain + 1):
        if scheduler == "local":
            ids.append(_run_local(job, script, i, run))
            continue
        argv = submit_commands(scheduler, script, previous)
        so_far = f"; submitted so far: {', '.join(ids)}" if ids else ""
        try:
            with open(script) as stdin:
                proc = run(argv, stdin=stdin if scheduler == "lsf" else subprocess.DEVNULL,
                           capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError(
                f"{argv[0]}: command not found; submit from a {job.machine.name} login node "
                f"(the script is saved: {script}){so_far}"
            ) from None
        if proc.returncode != 0:
            raise UserError(
                f"{argv[0]} refused job {i} of {job.chain} (exit {proc.returncode}): "
                f"{_first_line(proc.stderr, proc.stdout)}{so_far}"
            )
        job_id = parse_job_id(scheduler, proc.stdout + "\n" + proc.stderr)
        if job_id is None:
            raise UserError(f"{argv[0]}: no job id in its answer: {_first_line(proc.stdout, proc.stderr)}{so_far}")
        ids.append(job_id)
        previous = job_id
    return ids


def _run_local(job: Job, script: Path, i: int, run: Callable) -> str:
    """Run the script now, in the foreground (a workstation has no queue)."""
    log = script.parent / f"{job.task}.local-{script.stem}-{i}"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = run(["bash", str(script)], stdout=out, stderr=err, env={**os.environ, "STEMNET_LOCAL_JOB": str(i)})
    if proc.returncode != 0:
        lines = [line for line in Path(f"{log}.err").read_text().splitlines() if line.strip()]
        tail = lines[-1].strip() if lines else "no message"
        raise UserError(f"local job {i} of {job.chain} failed (exit {proc.returncode}): {tail}; log: {log}.err")
    return f"local-{i}"


@dataclass
class Submission:
    """What :func:`submit` did: the script (saved either way), its text, the job ids."""

    job: Job
    script: Path
    text: str
    job_ids: List[str] = field(default_factory=list)
    commands: List[str] = field(default_factory=list)  # what was (or would be) run


def submit(
    task: str,
    *,
    machine: str | Path,
    nodes: int,
    walltime: Optional[str],
    project: Optional[str],
    config: str | Path,
    out: str | Path,
    data: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
    chain: int = 1,
    dry_run: bool = False,
    run: Callable = subprocess.run,
) -> Submission:
    """Check, render, save in ``OUT/jobs/``, and (unless ``dry_run``) submit a job chain.

    Returns a :class:`Submission`; every failure before or during submission is a
    one-line :class:`UserError` (jobs already submitted in a chain are named in it).
    """
    job = build_job(task, machine=machine, nodes=nodes, walltime=walltime, project=project,
                    config=config, out=out, data=data, overrides=overrides, chain=chain)
    script = write_job(job)
    scheduler = job.machine.scheduler
    if scheduler == "local":
        commands = [f"bash {shlex.quote(str(script))}"] * job.chain
    else:
        commands = []
        for i in range(job.chain):
            argv = submit_commands(scheduler, script, None if i == 0 else f"<job {i}>")
            commands.append(shlex.join(argv) + (f" < {shlex.quote(str(script))}" if scheduler == "lsf" else ""))
    sub = Submission(job, script, script.read_text(), commands=commands)
    if not dry_run:
        sub.job_ids = submit_script(job, script, run=run)
    return sub


# ================================================================================ command
def _submit_command():
    import click

    @click.command("submit")
    @click.argument("task", type=click.Choice(TASKS))
    @click.option("--machine", required=True, metavar="NAME|FILE",
                  help=f"Machine profile: {', '.join(machine_names())}, or a YAML file.")
    @click.option("--nodes", type=int, required=True, help="Nodes per job.")
    @click.option("--walltime", metavar="HH:MM", help="Walltime per job (required except on local).")
    @click.option("--project", metavar="ID", help="Allocation to charge (LSF -P, Slurm -A).")
    @click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="Config: a 'simulation:' section to simulate; model/train/data/distributed to train.")
    @click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
                  help="train: the dataset folder (on the shared file system).")
    @click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="simulate: the dataset folder; train: the run folder (resumed by every job).")
    @click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. -o train.batch_size=8 (repeatable).")
    @click.option("--chain", type=int, default=1, show_default=True,
                  help="Submit K jobs, each starting when the previous one has ended.")
    @click.option("--dry-run", is_flag=True, help="Write and print the script; submit nothing.")
    def submit_cmd(task, machine, nodes, walltime, project, config_file, data_dir, out, overrides, chain, dry_run):
        """Render a batch script for TASK (simulate|train) on a machine and submit it.

        The script and the frozen config are saved in OUT/jobs/ either way.
        """
        sub = submit(task, machine=machine, nodes=nodes, walltime=walltime, project=project,
                     config=config_file, out=out, data=data_dir, overrides=overrides,
                     chain=chain, dry_run=dry_run)
        job = sub.job
        if dry_run:
            click.echo(sub.text, nl=False)
            for command in sub.commands:
                click.echo(f"# would run: {command}", err=True)
            click.echo(f"# script written to {sub.script} (not submitted: --dry-run)", err=True)
            return
        wall = format_walltime(job.walltime_min) if job.walltime_min else "no walltime"
        for i, job_id in enumerate(sub.job_ids):
            after = f", after {sub.job_ids[i - 1]}" if i else ""
            click.echo(f"submitted {job_id} ({i + 1}/{job.chain}{after}): {task} on {job.machine.name}, "
                       f"{job.nodes} node(s) x {job.machine.ranks_per_node} ranks, {wall}")
        click.echo(f"script: {sub.script}")

    return submit_cmd


submit_command = _submit_command()
