"""``stemnet scaling`` and ``timeline``: predict, calibrate and observe distributed training."""

from __future__ import annotations

import os
from pathlib import Path

import click

from stemnet.cli.app import OVERRIDE_HELP, cli, shape_option
from stemnet.shipped import ConfigFile


@cli.command()
@click.option("--model", "config_file", type=ConfigFile("model", "training"),
              help="A config with a 'model:' section; a training config also gives batch, precision "
                   "and the distributed settings (group budgets, fusion, compression)  "
                   "[--calibrate: configs/training/demo.yaml].")
@click.option("--machine", metavar="NAME|PATH",
              help="summit, frontier, perlmutter, local, or a YAML file with a 'network:' section  "
                   "[--calibrate: local].")
@click.option("--calibrate", is_flag=True,
              help="Measure allreduce time vs size on 2 ranks (horovodrun --gloo), fit alpha and beta, and "
                   "check the model against the measured 2-rank step of --model per strategy.")
@click.option("--write", "write_path", type=click.Path(dir_okay=False, path_type=Path),
              help="--calibrate: write the machine profile with the calibrated network here.")
@click.option("--validate", is_flag=True,
              help="Reproduce published scaling results (configs/scaling/*.yaml): model against paper.")
@click.option("--gpus", default="6,96,1536,27600", show_default=True, metavar="N,N,...",
              help="GPU counts to predict (weak scaling: the per-GPU batch is fixed).")
@click.option("--strategies", default="none,count:4,layer,graph", show_default=True,
              help="Gradient-grouping strategies to compare (table columns).")
@click.option("--input-shape", callback=shape_option(3), metavar="H,W,C", default="32,32,16",
              show_default=True, help="One input sample, channels-last.")
@click.option("--output-shape", callback=shape_option(2), metavar="H,W",
              help="Target maps' size  [default: the input's H,W].")
@click.option("--batch", type=click.IntRange(min=1), help="Per-GPU batch  [default: train.batch_size, else 1].")
@click.option("--precision", type=click.Choice(["float32", "mixed_float16", "mixed_bfloat16"]),
              help="Picks the machine's peak FLOP rate  [default: train.precision, else float32].")
@click.option("--algorithm", type=click.Choice(["ring", "tree", "flat"]),
              help="Inter-node allreduce  [default: the machine's].")
@click.option("--measure", is_flag=True,
              help="Time forward, backward and update on this host instead of analytic FLOPs.")
@click.option("--cycle-groups", is_flag=True, help="Explicit groups also wait for Horovod's cycle ticks.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the prediction (inputs, per-layer costs, table) as JSON.")
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def scaling(config_file, machine, calibrate, write_path, validate, gpus, strategies, input_shape, output_shape,
            batch, precision, algorithm, measure, cycle_groups, json_path, overrides) -> None:
    """Predict step time and parallel efficiency per gradient-grouping strategy on a machine
    (or --calibrate the model on this machine, or --validate it against published results)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import json

    if calibrate or validate:
        if calibrate:
            from stemnet.distributed.calibrate import DEFAULT_CONFIG, calibrate as run_calibration, format_calibration

            result = run_calibration(config_file or DEFAULT_CONFIG, machine or "local", write=write_path)
            click.echo(format_calibration(result))
        else:
            from stemnet.distributed.validate import format_validation, validate_published

            result = validate_published()
            click.echo(format_validation(result))
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            click.echo(f"written to {json_path}")
        return
    if config_file is None or machine is None:
        raise click.UsageError("--model and --machine are required (or --calibrate / --validate)")

    from stemnet.distributed.scaling import format_prediction, parse_gpus, scaling_report

    prediction = scaling_report(
        config_file, machine, parse_gpus(gpus), input_shape=input_shape, output_shape=output_shape,
        batch=batch, precision=precision, strategies=[s.strip() for s in strategies.split(",") if s.strip()],
        algorithm=algorithm, measure=measure, cycle_groups=cycle_groups, overrides=overrides,
    )
    click.echo(format_prediction(prediction))
    if json_path is not None:
        json_path.write_text(json.dumps(prediction, indent=2) + "\n")
        click.echo(f"prediction written to {json_path}")


# ------------------------------------------------------------------------ timeline
@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the per-step summary as JSON.")
def timeline(file, json_path) -> None:
    """Summarise a Horovod timeline (HOROVOD_TIMELINE): per step, backprop span, allreduce
    time, the fraction of it overlapped with backprop, and negotiation time."""
    import json

    from stemnet.distributed.timeline import format_timeline, summarize_timeline

    summary = summarize_timeline(file)
    click.echo(format_timeline(summary))
    if json_path is not None:
        json_path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        click.echo(f"summary written to {json_path}")
