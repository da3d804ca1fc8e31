"""The ``stemnet`` command group, its shared options, and the entry point :func:`main`.

Heavy libraries (TensorFlow, Horovod, abTEM) are imported inside the sub-commands that
need them, so ``stemnet --help`` and config work stay fast.
"""

from __future__ import annotations

import click

from stemnet import __version__
from stemnet.errors import UserError
from stemnet.log import setup_logging

OVERRIDE_HELP = "Override a config value, e.g. -o train.batch_size=8 (repeatable)."
# library arguments whose option is not ``--`` + the name with dashes
OPTION_WORDS = {"overrides": "-o", "tta": "--no-tta", "inputs": "INPUT files", "pixel_size_ang": "--pixel-size"}


def option_word(name: str) -> str:
    """The command-line option of a library argument (``pixel_size`` -> ``--pixel-size``)."""
    return OPTION_WORDS.get(name, "--" + name.replace("_", "-"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="stemnet", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on rank 0.")
def cli(verbose: bool) -> None:
    """stemnet: STEM inverse imaging with deep learning trained on multislice simulations."""
    setup_logging(verbose)


def shape_option(length: int):
    """click callback: 'H,W[,C]' -> tuple of ``length`` positive ints, or a one-line error."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            shape = tuple(int(v) for v in value.split(","))
        except ValueError:
            shape = ()
        if len(shape) != length or min(shape) <= 0:
            axes = "H,W,C" if length == 3 else "H,W"
            raise click.BadParameter(f"expected {length} positive integers {axes}, got {value!r}")
        return shape

    return parse


def main(argv=None) -> int:
    """Entry point: one-line errors for bad input, exit codes 0 / 1 / 2."""
    try:
        cli.main(args=argv, prog_name="stemnet", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}".splitlines()[0], err=True)
        return err.exit_code
    except UserError as err:  # the library names its arguments; the user typed options
        click.echo(f"error: {err.worded(option_word)}".splitlines()[0], err=True)
        return 2
    return 0
