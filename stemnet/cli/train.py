"""``stemnet train`` and ``evaluate``: fit a model to a dataset and measure it."""

from __future__ import annotations

import os
from pathlib import Path

import click

from stemnet.cli.app import OVERRIDE_HELP, cli
from stemnet.shipped import ConfigFile


@cli.command()
@click.option("--config", "config_file", required=True, type=ConfigFile("training"),
              help="Training config (model, train, data, distributed sections), or a shipped name.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder written by `stemnet simulate`.")
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder; an existing one is resumed from its last checkpoint.")
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many steps in this call.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(config_file, data_dir, run_dir, overrides, max_steps, no_progress) -> None:
    """Train the model on DIR's shards (resumes RUN); run under horovodrun/jsrun for many ranks."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.config import load_config
    from stemnet.data import one_line_errors
    from stemnet.train.loop import train as run_training

    cfg = load_config(config_file, overrides, require=("model", "train"))
    with one_line_errors():
        summary = run_training(cfg, data_dir, run_dir, progress=not no_progress, max_steps=max_steps)
    if summary.get("rank", 0) == 0:
        loss = summary["train_loss"].get("total", float("nan"))
        val = summary["val_loss"].get("total")
        click.echo(
            f"trained to step {summary['steps']}/{summary['target_steps']} on {summary['world']} rank(s): "
            f"loss {loss:.4g}" + (f", val loss {val:.4g}" if val is not None else "")
            + f", {summary['samples_per_s']:.1f} samples/s, {summary['skipped_steps']} skipped steps; run in {run_dir}"
        )


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder to evaluate on.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the metrics here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG: inputs, truth, prediction, error.")
def evaluate(run_dir, data_dir, split, json_path, plot_path) -> None:
    """Metrics of RUN's model beside the zero / mean / column-fit baselines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.data import one_line_errors
    from stemnet.evaluate import evaluate as run_evaluation
    from stemnet.evaluate import format_table, write_json

    with one_line_errors():
        summary = run_evaluation(run_dir, data_dir, split, plot=plot_path)
    click.echo(format_table(summary))
    if json_path:
        write_json(json_path, summary)
    m = summary["metrics"]["model"]
    click.echo(f"{summary['samples']} {split} samples: potential R2 {m.get('potential_r2', float('nan')):.3f}, "
               f"displacement RMSE {m.get('displacement_rmse_all_ang', float('nan')):.4f} Å "
               f"(zero baseline {summary['metrics']['zero'].get('displacement_rmse_all_ang', float('nan')):.4f} Å)")
