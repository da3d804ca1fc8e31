"""``stemnet submit`` and ``stemnet launch``: batch jobs on a machine, workers on this one."""

from __future__ import annotations

from pathlib import Path

import click

from stemnet.cli.app import OVERRIDE_HELP, cli
from stemnet.distributed.launch import launch
from stemnet.hpc import TASKS, machine_names
from stemnet.hpc.submit import submit


@cli.command("submit")
@click.argument("task", type=click.Choice(TASKS))
@click.option("--machine", required=True, metavar="NAME|FILE",
              help=f"Machine profile: {', '.join(machine_names())} (configs/machines/NAME.yaml), or a YAML file.")
@click.option("--nodes", type=int, required=True, help="Nodes per job.")
@click.option("--walltime", metavar="HH:MM", help="Walltime per job (required except on local).")
@click.option("--project", metavar="ID", help="Allocation to charge (LSF -P, Slurm -A).")
@click.option("--config", "config_file", required=True, metavar="FILE|NAME",
              help="Config: a 'simulation:' section to simulate; model/train/data/distributed to train "
                   "(or a shipped name: `stemnet config list`).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="train: the dataset folder (on the shared file system).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="simulate: the dataset folder; train: the run folder (resumed by every job).")
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--chain", type=int, default=1, show_default=True,
              help="Submit K jobs, each starting when the previous one has ended.")
@click.option("--dry-run", is_flag=True, help="Write and print the script; submit nothing.")
def submit_command(task, machine, nodes, walltime, project, config_file, data_dir, out, overrides, chain, dry_run):
    """Render a batch script for TASK (simulate|train) on a machine and submit it.

    The script and the frozen config are saved in OUT/jobs/ either way.
    """
    from stemnet.shipped import resolve_config

    config_file = resolve_config(config_file, ("simulation",) if task == "simulate" else ("training",))
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
    from stemnet.hpc.machines import format_walltime

    wall = format_walltime(job.walltime_min) if job.walltime_min else "no walltime"
    for i, job_id in enumerate(sub.job_ids):
        after = f", after {sub.job_ids[i - 1]}" if i else ""
        click.echo(f"submitted {job_id} ({i + 1}/{job.chain}{after}): {task} on {job.machine.name}, "
                   f"{job.nodes} node(s) x {job.machine.ranks_per_node} ranks, {wall}")
    click.echo(f"script: {sub.script}")


@cli.command("launch", context_settings={"ignore_unknown_options": True})
@click.option("-n", "--workers", "count", type=click.IntRange(min=1), required=True,
              help="Number of workers to start on this machine.")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds the other workers get after SIGTERM before SIGKILL, once one has failed.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def launch_command(count: int, grace_s: float, command) -> None:
    """Run COMMAND as N tf.distribute (MWMS) workers on localhost, e.g. `stemnet launch -n 2 -- stemnet train ...`."""
    code = launch(count, command, grace_s=grace_s)
    if code:
        raise SystemExit(code)  # the failed worker's code (click's Exit is swallowed by stemnet's main)
