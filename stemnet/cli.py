"""The ``stemnet`` command: one sub-command per user task.

Heavy libraries (TensorFlow, Horovod, abTEM) are imported inside the sub-commands that
need them, so ``stemnet --help`` and config work stay fast.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import click

from stemnet import __version__
from stemnet.errors import UserError
from stemnet.log import setup_logging

OVERRIDE_HELP = "Override a config value, e.g. -o train.batch_size=8 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="stemnet", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on rank 0.")
def cli(verbose: bool) -> None:
    """stemnet: STEM inverse imaging with deep learning trained on multislice simulations."""
    setup_logging(verbose)


# ----------------------------------------------------------------------------- info
def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "installed")
    except Exception as err:  # an import failure is information here, not a crash
        return f"not available ({type(err).__name__}: {err})".splitlines()[0]


def collect_info() -> dict:
    """Versions and capabilities of this installation (what ``stemnet info`` prints)."""
    info = {
        "stemnet": __version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "tensorflow": _version("tensorflow"),
    }
    try:
        import tensorflow as tf

        info["keras"] = _version("keras")
        gpus = tf.config.list_physical_devices("GPU")
        info["gpus"] = str(len(gpus))
    except Exception:
        info["keras"] = "not available"
        info["gpus"] = "unknown"
    info["horovod"] = _version("horovod")
    try:
        import horovod.tensorflow as hvd
        from horovod.common.util import extension_available

        frameworks = [
            label
            for label, ext in [("TensorFlow", "tensorflow"), ("PyTorch", "torch"), ("MXNet", "mxnet")]
            if extension_available(ext)
        ]
        controllers = [n for n, f in [("MPI", hvd.mpi_built), ("Gloo", hvd.gloo_built)] if f()]
        ops = [
            n
            for n, f in [
                ("NCCL", hvd.nccl_built),
                ("DDL", hvd.ddl_built),
                ("CCL", hvd.ccl_built),
                ("MPI", hvd.mpi_built),
                ("Gloo", hvd.gloo_built),
            ]
            if f()
        ]
        info["horovod frameworks"] = ", ".join(frameworks) or "none"
        info["horovod controllers"] = ", ".join(controllers) or "none"
        info["horovod tensor operations"] = ", ".join(ops) or "none"
    except Exception as err:
        info["horovod frameworks"] = f"unavailable ({type(err).__name__})"
    for name in ("abtem", "ase", "lmdb", "h5py", "scipy", "pydantic"):
        info[name] = _version(name)
    info["cpus"] = str(os.cpu_count())
    flags = _cpu_flags()
    info["bf16 (cpu)"] = "yes" if flags & {"avx512_bf16", "amx_bf16"} else "no"
    return info


@cli.command()
def info() -> None:
    """Versions of the stack, how Horovod was built, CPUs, GPU and bf16 support."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data = collect_info()
    width = max(len(k) for k in data)
    for key, value in data.items():
        click.echo(f"{key + ':':<{width + 1}} {value}")


# --------------------------------------------------------------------------- config
@cli.group()
def config() -> None:
    """Show or validate a configuration file."""


@config.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_show(file: Path, overrides: tuple) -> None:
    """Print FILE, resolved and validated, with overrides applied, as YAML."""
    from stemnet.config import load_config, to_yaml

    click.echo(to_yaml(load_config(file, overrides)), nl=False)


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_validate(file: Path, overrides: tuple) -> None:
    """Check FILE; print 'ok' and its sections, or a one-line error."""
    from stemnet.config import load_config

    cfg = load_config(file, overrides)
    sections = [name for name in type(cfg).model_fields if name in cfg.model_fields_set]
    click.echo(f"{file}: ok ({', '.join(sections) or 'defaults only'})")


# ----------------------------------------------------------------------------- main
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
    except UserError as err:
        click.echo(f"error: {err}".splitlines()[0], err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
