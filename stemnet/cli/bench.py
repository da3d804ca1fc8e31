"""``stemnet bench``: benchmarks, ratios measured side by side in one run."""

from __future__ import annotations

import os
from pathlib import Path

import click

from stemnet.cli.app import cli, shape_option
from stemnet.shipped import ConfigFile


@cli.group()
def bench() -> None:
    """Benchmarks: ratios measured side by side in one run (see README, Performance)."""


def _print_ratios(result: dict, json_path) -> None:
    from stemnet.bench import write

    def show(values: dict, prefix: str = "") -> None:
        for key, value in values.items():
            if isinstance(value, float):
                click.echo(f"{prefix}{key}: {value:.4g}")
            elif isinstance(value, dict) and key in ("cold", "large"):
                show(value, f"{prefix}{key}.")

    show(result)
    write(result, json_path)
    if json_path:
        click.echo(f"written to {json_path}")


JSON_OPTION = click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                           help="Also write the figures as JSON.")


@bench.command("simulate")
@click.option("--config", "config_file", type=ConfigFile("simulation"),
              help="Simulation config (cbed mode)  [default: shipped simulation/bench].")
@JSON_OPTION
def bench_simulate_cmd(config_file, json_path) -> None:
    """Generator CBED patterns/s vs a bare FFT multislice loop and naive abTEM."""
    from stemnet.bench import bench_simulate

    _print_ratios(bench_simulate(config_file), json_path)


@bench.command("data")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_file", type=ConfigFile("training"),
              help="Training config  [default: shipped training/demo].")
@click.option("--large/--no-large", default=True, show_default=True,
              help="Also measure a synthetic dataset of 315 KB records (bench.yaml shapes).")
@JSON_OPTION
def bench_data_cmd(data_dir, config_file, large, json_path) -> None:
    """Input pipeline samples/s vs raw LMDB, h5py, and the training step (page cache and disk)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.bench import bench_data_pipeline

    _print_ratios(bench_data_pipeline(data_dir, config_file,
                                      large=large), json_path)


@bench.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_file", type=ConfigFile("training"),
              help="Training config  [default: shipped training/demo].")
@JSON_OPTION
def bench_train_cmd(data_dir, config_file, json_path) -> None:
    """Our training step vs Keras model.fit, and mixed_bfloat16 vs float32."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.bench import bench_train

    _print_ratios(bench_train(data_dir, config_file), json_path)


@bench.command("grouping")
@click.option("--config", "config_file", type=ConfigFile("training"),
              help="Training config  [default: shipped training/demo].")
@click.option("--input-shape", callback=shape_option(3), metavar="H,W,C", default="16,16,2", show_default=True)
@click.option("--backend", "backends", type=click.Choice(["horovod", "mwms"]), multiple=True,
              help="Backend(s) to measure, side by side  [default: every installed one].")
@JSON_OPTION
def bench_grouping_cmd(config_file, input_shape, backends, json_path) -> None:
    """2 ranks (Horovod/Gloo, MWMS/gRPC): step time per grouping strategy vs none; 2 ranks vs 1."""
    from stemnet.bench import bench_grouping

    _print_ratios(bench_grouping(config_file, input_shape, backends=list(backends) or None), json_path)


@bench.command("sim2real")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The run's training dataset (its microscope, detectors and draws).")
@click.option("--samples", type=click.IntRange(min=1), default=6, show_default=True,
              help="Held-out micrographs (tilt systems a−a−c0, a−a−a−, a0a0c+ in turn; about 40 s each).")
@JSON_OPTION
def bench_sim2real_cmd(run_dir, data_dir, samples, json_path) -> None:
    """Reconstruction of realistic held-out micrographs (0.1 Å, >= 256 px, unseen imperfections) vs truth."""
    import json

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.reconstruct.benchmark import bench_sim2real, write

    result = bench_sim2real(run_dir, data_dir, samples=samples)
    click.echo(json.dumps(result, indent=1))
    write(result, json_path)
