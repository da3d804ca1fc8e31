"""Job scripts: validate a ``stemnet submit`` request and render its batch script.

A script is three templates from ``jobs/`` rendered with the same values and joined:
``jobs/{scheduler}.sh`` (directives), ``jobs/setup.sh`` (modules, environment, paths,
Horovod settings) and ``jobs/{task}.sh`` (the steps). Placeholders are ``{{name}}``;
everything else is plain bash. See ``jobs/README.md``.

Public API
----------
Job, build_job(task, ...) -> Job (every check, one-line errors)
launch_command(machine, nodes) -> argv; render_template(text, values) -> str
script_values(job, config_file, log_prefix) -> dict; render_script(job, config_file) -> str
write_job(job) -> Path (OUT/jobs/{task}-{stamp}.sh beside its frozen config)
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from stemnet.errors import UserError, argument
from stemnet.hpc import TASKS
from stemnet.hpc.machines import Machine, format_walltime, load_machine, parse_walltime
from stemnet.ranks import RANK_VARIABLES
from stemnet.shipped import shipped_dir

TEMPLATES_DIR = shipped_dir("jobs")  # package data in a wheel, jobs/ in a checkout
SECTIONS_NEEDED = {"simulate": ("simulation",), "train": ("model", "train")}
JOB_ID_VARIABLE = {"lsf": "$LSB_JOBID", "slurm": "$SLURM_JOB_ID", "local": "$$"}

_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%,:=-]+$")  # usable unquoted in a #BSUB/#SBATCH line
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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


def directive_path(path: Path, option: str) -> str:
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
    task needs), data (train: a dataset with a manifest; simulate: not allowed), chain.
    """
    from stemnet.config import Config, load_config

    if task not in TASKS:
        raise UserError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    m = machine if isinstance(machine, Machine) else load_machine(machine)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes <= 0:
        raise UserError(f"{argument('nodes')} {nodes}: expected a positive number of nodes")
    if "{venv}" in m.activate and not (Path(sys.prefix) / "bin" / "activate").is_file():
        raise UserError(
            f"{argument('machine')} {m.name}: its activate line uses {{venv}}, but {sys.prefix} (where stemnet submit "
            "runs) has no bin/activate; run from the job's virtual environment or set activate in the profile"
        )
    if nodes > m.max_nodes:
        raise UserError(f"{argument('nodes')} {nodes}: {m.name} has at most {m.max_nodes} node(s) per job")
    minutes = None
    if walltime is None or str(walltime).strip() == "":
        if m.scheduler != "local":
            raise UserError(f"{argument('walltime')}: required on {m.name} ({m.scheduler}); expected HH:MM")
    else:
        minutes = parse_walltime(walltime)
        limit = m.walltime_limit(nodes)
        if limit is not None and minutes > limit:
            raise UserError(
                f"{argument('walltime')} {walltime}: {m.name} allows at most {format_walltime(limit)} "
                f"for a job of {nodes} node(s)"
            )
        if task == "train" and m.scheduler != "local" and minutes <= m.signal_minutes:
            raise UserError(
                f"{argument('walltime')} {walltime}: expected more than the {m.signal_minutes} minutes "
                "reserved for the checkpoint signal before the walltime kill"
            )
    if m.scheduler != "local":
        if not project or not str(project).strip():
            option = "-P" if m.scheduler == "lsf" else "-A"
            raise UserError(f"{argument('project')}: required on {m.name} (the allocation to charge, {m.scheduler} {option})")
        if not re.match(r"^[A-Za-z0-9_.-]+$", str(project)):
            raise UserError(f"{argument('project')} {project}: expected letters, digits, '_', '.' or '-'")
    schema = Config
    if task == "simulate":  # the simulator owns its section's schema (simulation imports no abTEM here)
        from simulation.config import SimulationFile as schema
    cfg = load_config(config, overrides, require=SECTIONS_NEEDED[task], schema=schema)
    if task == "train" and m.backend != "auto" and cfg.distributed.backend == "auto":
        cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"backend": m.backend})})
    out_path = Path(out).expanduser().resolve()
    directive_path(out_path, argument("out"))
    data_path = None
    if task == "simulate":
        if data is not None:
            raise UserError(f"{argument('data')}: only for `submit train`; a simulation writes its dataset to {argument('out')}")
    else:
        if data is None:
            raise UserError(f"{argument('data')}: required for `submit train`; expected a dataset folder written by `stemnet simulate`")
        data_path = Path(data).expanduser().resolve()
        if not (data_path / "manifest.json").is_file():
            raise UserError(f"{argument('data')} {data}: no manifest.json; expected a finished dataset (its manifest written when every shard was)")
        if data_path == out_path:
            raise UserError(f"{argument('out')} {out}: the run folder is the dataset; expected another folder")
    if not isinstance(chain, int) or isinstance(chain, bool) or chain < 1:
        raise UserError(f"{argument('chain')} {chain}: expected a positive number of jobs")
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
            # the allocation must hold the steps' srun geometry (Slurm's default is 1 CPU per node)
            f"--ntasks-per-node={m.ranks_per_node}",
            f"--cpus-per-task={m.cores_per_rank * m.threads_per_core}",
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
    mwms = job.task == "train" and job.config.distributed.backend == "mwms"
    horovod = horovod_environment(job.config.distributed) if job.task == "train" and not mwms else {}
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
        or ("# (no Horovod: distributed.backend mwms; every rank builds TF_CONFIG from the launcher's "
            "variables, ports from STEMNET_MWMS_PORT_BASE, default 12345)" if mwms
            else "# (no Horovod: simulation ranks do not communicate)"),
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
        log_prefix = directive_path(job.out / "jobs" / job.task, argument("out"))
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
