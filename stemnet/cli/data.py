"""``stemnet simulate``, ``inspect`` and ``stage``: make, describe and stage a dataset."""

from __future__ import annotations

from pathlib import Path

import click

from stemnet.cli.app import OVERRIDE_HELP, cli
from stemnet.errors import UserError
from stemnet.shipped import ConfigFile


@cli.command()
@click.option("--config", "config_file", type=ConfigFile("simulation"),
              help="Simulation config (a file with a 'simulation:' section, or a shipped name).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Dataset folder.")
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this node, one shard each.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --out.")
@click.option("--finalize", "finalize_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Only write DIR/manifest.json from its shards (after a multi-rank run).")
@click.option("--wait", "wait_s", type=float, default=600.0, show_default=True,
              help="Seconds rank 0 waits for the other ranks before leaving the manifest to --finalize.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def simulate(config_file, out, overrides, workers, overwrite, finalize_dir, wait_s, no_progress) -> None:
    """Generate (or resume) a simulated dataset of sharded LMDB files.

    Under a batch launcher (jsrun, srun, mpirun) every rank writes its own shards; rank 0
    writes the manifest when all are done.
    """
    from simulation.config import load_simulation
    from stemnet.ranks import launcher_rank

    if finalize_dir is not None:
        from simulation.generator import CONFIG_NAME, finalize

        cfg_path = Path(config_file) if config_file else finalize_dir / CONFIG_NAME
        cfg = load_simulation(cfg_path, overrides)
        manifest = finalize(cfg, finalize_dir)
        counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
        click.echo(f"{finalize_dir}: manifest written ({counts})")
        return
    if config_file is None or out is None:
        raise click.UsageError("--config and --out are required (or --finalize DIR)")
    cfg = load_simulation(config_file, overrides)
    from simulation.generator import generate

    try:
        rank = launcher_rank()
    except ValueError as err:
        raise UserError(str(err)) from None
    summary = generate(cfg, out, workers=workers, rank=rank.rank, world=rank.world,
                       overwrite=overwrite, wait_s=wait_s, progress=not no_progress)
    tail = "manifest written" if summary["finalized"] else "manifest pending (--finalize)"
    click.echo(
        f"simulated {summary['written']} new of {summary['planned']} samples in {summary['seconds']:.1f} s "
        f"({summary['samples_per_s']:.2f} samples/s) into {out}; {tail}"
    )


# --------------------------------------------------------------------- inspect/stage
@cli.command("inspect")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--verify", is_flag=True, help="Check every record's CRC-32 and every shard header against the manifest.")
@click.option("--plot", "png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a montage of a few samples to this PNG.")
@click.option("-n", "--samples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Samples in the --plot montage.")
def inspect_command(directory, verify, png, samples):
    """Describe the dataset in DIRECTORY: splits, shards, shapes, statistics, simulation config."""
    from stemnet.stage import inspect_dataset, plot_samples

    text, faults = inspect_dataset(directory, verify=verify)
    click.echo(text)
    if png is not None and not faults:
        click.echo(f"plot: {plot_samples(directory, png, n=samples)}")
    for fault in faults:
        click.echo(f"fault: {fault}", err=True)
    if faults:
        raise UserError(f"{directory}: {len(faults)} fault(s); first: {faults[0]}")


@cli.command("stage")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Node-local folder, e.g. /mnt/bb/$USER/data-{rank} ({rank} becomes the rank).")
@click.option("--rank", type=click.IntRange(min=0), help="This rank (default: from jsrun/srun/mpirun).")
@click.option("--world", type=click.IntRange(min=1), help="Number of ranks (default: from the launcher).")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "val", "test"]),
              default=("train", "val"), show_default=True, help="Splits to stage (repeatable).")
def stage_command(directory, dest, rank, world, splits):
    """Copy this rank's shards and the manifest to node-local storage, CRC-verified."""
    from stemnet.ranks import launcher_rank
    from stemnet.stage import stage

    if (rank is None) != (world is None):
        raise click.UsageError("--rank and --world go together")
    if rank is None:
        try:
            info = launcher_rank()
        except ValueError as err:
            raise UserError(str(err)) from None
        rank, world = info.rank, info.world
    if rank >= world:
        raise click.UsageError(f"--rank {rank}: expected a rank below --world {world}")
    click.echo(stage(directory, dest, rank=rank, world=world, splits=splits))
