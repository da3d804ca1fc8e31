"""Submission: ``stemnet submit {simulate|train} --machine M --nodes N ...``.

Checks everything it can on the login node (machine profile, node count, walltime
against the machine's limits, project, the config), writes ``DIR/jobs/{task}-{time}.sh``
(plus ``{task}-{time}.yaml``, the config resolved and frozen for every job of the chain),
then submits it with ``bsub`` (LSF) or ``sbatch`` (Slurm), or runs it in the foreground
(``scheduler: local``). ``--chain K`` submits the same script K times, each job depending
on the previous one ending; a training run resumes from its last checkpoint in every job,
a simulation resumes its shards.

Public API
----------
submit(task, machine=..., ...) -> Submission (the command is stemnet.cli.jobs)
parse_job_id(scheduler, output); dependency_args(scheduler, previous); submit_commands(...)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from stemnet.errors import UserError

if TYPE_CHECKING:
    from stemnet.hpc.render import Job

SUBMIT_COMMAND = {"lsf": "bsub", "slurm": "sbatch"}


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


def submit(task: str, *, dry_run: bool = False, run: Callable = subprocess.run, **request) -> Submission:
    """Check, render, save in ``OUT/jobs/``, and (unless ``dry_run``) submit a job chain.

    ``request``: the keywords of :func:`stemnet.hpc.render.build_job` (machine, nodes,
    walltime, project, config, out, data, overrides, chain). Returns a
    :class:`Submission`; every failure before or during submission is a one-line
    :class:`UserError` (jobs already submitted in a chain are named in it).
    """
    from stemnet.hpc.render import build_job, write_job

    job = build_job(task, **request)
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
