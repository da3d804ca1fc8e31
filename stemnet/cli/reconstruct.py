"""``stemnet reconstruct`` and ``calibrate``: a trained model on experimental micrographs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from stemnet.cli.app import cli


@cli.command("reconstruct")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: NAME.hspy (HyperSpy HDF5) and NAME.png per input (replaced if present).")
@click.option("--channels", metavar="NAME=FILE,...",
              help="One file per detector channel of one field of view, e.g. haadf=a.dm4,abf=b.dm4.")
@click.option("--dataset", metavar="PATH", help="Dataset inside a plain HDF5 file (or array name in a .npz).")
@click.option("--pixel-size", type=float, metavar="ANG", help="Pixel size in Å; overrides the file's calibration.")
@click.option("--fill-nan", is_flag=True, help="Replace NaN/Inf pixels by the channel median instead of failing.")
@click.option("--intensity", type=click.Choice(["match", "raw"]), default="match", show_default=True,
              help="match: each channel's mean/std matched to the training statistics; raw: images already "
                   "in simulation units (fractions of the beam).")
@click.option("--no-tta", is_flag=True, help="One pass instead of the 8-symmetry ensemble (no uncertainty maps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per model call.")
@click.option("--no-plot", is_flag=True, help="No PNG figure.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--force", is_flag=True, help="Reconstruct a lattice the run never saw (recorded in the output).")
def reconstruct_command(run_dir, inputs, out, channels, dataset, pixel_size, fill_nan, intensity, no_tta,
                        batch_size, no_plot, no_progress, force) -> None:
    """Reconstruct STEM images (INPUT...) with RUN's model: potential, displacements, uncertainty."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.reconstruct import format_summary, reconstruct_files

    results = reconstruct_files(run_dir, inputs, out, channels=channels, dataset=dataset, pixel_size=pixel_size,
                                fill_nan=fill_nan, intensity=intensity, tta=not no_tta, batch_size=batch_size,
                                plot=not no_plot, progress=not no_progress, force=force)
    for rec, path in results:
        click.echo(format_summary(rec, path))


@cli.command("calibrate")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The run's dataset; its split is held out from training.")
@click.option("--split", default="val", show_default=True, help="Split to calibrate on.")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--micrographs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fit on this many realistic micrographs simulated inside the training draws (about 11 s "
                   "each) instead of the split's samples; the split still gives the reference spread.")
@click.option("--seed", type=int, default=2027, show_default=True, help="Seed of the calibration micrographs.")
def calibrate_command(run_dir, data_dir, split, samples, micrographs, seed) -> None:
    """Calibrate RUN's ensemble uncertainty on held-out simulations (writes RUN/uncertainty.json)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.reconstruct import calibrate_uncertainty

    r = calibrate_uncertainty(run_dir, data_dir, split, samples, micrographs=micrographs, seed=seed, progress=True)
    where = f"{micrographs} micrographs'" if micrographs else split
    click.echo(f"{run_dir}: variance scale {r.get('variance_scale', float('nan')):.3g} on {r.get('values', 0)} "
               f"{where} values (1-sigma coverage {r.get('coverage_raw', float('nan')):.1%} raw, "
               f"{r.get('coverage_scaled', float('nan')):.1%} scaled) -> {run_dir}/uncertainty.json")
    per = r.get("variance_scale_per_sublattice")
    if per:
        cov = r.get("coverage_scaled_per_sublattice") or {}
        click.echo("  per sublattice (reconstruction applies these): " + ", ".join(
            f"{name} {scale:.3g} ({cov.get(name) or float('nan'):.1%})" for name, scale in per.items()))
