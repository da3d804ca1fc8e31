"""``stemnet demo``: the whole pipeline on the shipped micrograph."""

from __future__ import annotations

import os
from pathlib import Path

import click

from stemnet.cli.app import cli


@cli.command()
@click.option("--out", "root", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Demo folder (data, run, reconstruction, REPORT.md).")
@click.option("--tiny", is_flag=True, help="The test-suite configs: the same pipeline in about a minute.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(root, tiny, workers, no_progress) -> None:
    """Simulate, train, evaluate and reconstruct the shipped micrograph; write REPORT.md."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import time

    from stemnet.data import one_line_errors
    from stemnet.demo import run_demo

    t0 = time.perf_counter()
    with one_line_errors():
        report = run_demo(root, tiny=tiny, workers=workers, progress=not no_progress)
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {report}")
