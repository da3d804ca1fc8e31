"""``stemnet model``: inspect the network a config describes."""

from __future__ import annotations

import os

import click

from stemnet.cli.app import OVERRIDE_HELP, cli, shape_option
from stemnet.shipped import ConfigFile


@cli.group()
def model() -> None:
    """Inspect the network a config describes."""


@model.command("summary")
@click.argument("file", type=ConfigFile("model", "training"))
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--input-shape", callback=shape_option(3), metavar="H,W,C", default="32,32,16",
              show_default=True, help="One input sample, channels-last.")
@click.option("--output-shape", callback=shape_option(2), metavar="H,W",
              help="Target maps' size  [default: the input's H,W].")
def model_summary_cmd(file, overrides, input_shape, output_shape) -> None:
    """Per-layer parameters, gradient bytes and FLOPs of FILE's model, in backprop order."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.config import load_config
    from stemnet.models import format_summary, model_summary

    cfg = load_config(file, overrides, require=("model",)).model
    click.echo(format_summary(model_summary(cfg, input_shape, output_shape)))
