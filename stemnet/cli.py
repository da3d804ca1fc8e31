"""The ``stemnet`` command: one sub-command per user task.

Heavy libraries (TensorFlow, Horovod, abTEM) are imported inside the sub-commands that
need them, so ``stemnet --help`` and config work stay fast.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

import click

from stemnet import __version__
from stemnet.errors import UserError
from stemnet.log import setup_logging
from stemnet.shipped import ConfigFile

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

        # the Keras that tf.keras is: tf_keras on the modern stack (Keras 3 is installed but unused)
        info["keras"] = _version("tf_keras") + " (tf_keras)" if "tf_keras" in tf.keras.__name__ else _version("keras")
        gpus = tf.config.list_physical_devices("GPU")
        info["gpus"] = str(len(gpus))
    except Exception:
        info["keras"] = "not available"
        info["gpus"] = "unknown"
    from stemnet.distributed.backends import horovod_available, resolve_backend

    modern = importlib.util.find_spec("tf_keras") is not None
    info["stack"] = ("modern (TensorFlow >= 2.16 + tf_keras, numpy 2, abTEM 1.0.11)" if modern
                     else "pinned (TensorFlow 2.15 + Horovod 0.28.1, numpy 1.26, abTEM 1.0.9)")
    info["backend"] = f"{resolve_backend('auto')} (distributed.backend: auto; horovod, mwms: " \
                      f"{'both' if horovod_available() else 'mwms only'})"
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
    """Versions of the stack, the distributed backend, how Horovod was built, CPUs, GPU and bf16."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data = collect_info()
    width = max(len(k) for k in data)
    for key, value in data.items():
        click.echo(f"{key + ':':<{width + 1}} {value}")


# --------------------------------------------------------------------------- config
@cli.group()
def config() -> None:
    """Show, validate, list or copy configuration files (a FILE or a shipped NAME)."""


@config.command("list")
def config_list() -> None:
    """The shipped configs by kind; use a NAME wherever a config file is asked for."""
    from stemnet.shipped import shipped_configs, shipped_dir

    click.echo(f"shipped configs in {shipped_dir('configs')}:")
    for kind, names in shipped_configs().items():
        click.echo(f"  {kind:<11} {' '.join(names)}")


@config.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
def config_copy(name: str, dest: Path) -> None:
    """Copy shipped config NAME (e.g. training/demo) to DEST (a file or a folder) to edit."""
    from stemnet.shipped import copy_config

    click.echo(f"copied {name} to {copy_config(name, dest)}")


@config.command("show")
@click.argument("file", type=ConfigFile())
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_show(file: Path, overrides: tuple) -> None:
    """Print FILE, resolved and validated, with overrides applied, as YAML."""
    from stemnet.config import load_config, to_yaml

    click.echo(to_yaml(load_config(file, overrides)), nl=False)


@config.command("validate")
@click.argument("file", type=ConfigFile())
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_validate(file: Path, overrides: tuple) -> None:
    """Check FILE; print 'ok' and its sections, or a one-line error."""
    from stemnet.config import load_config

    cfg = load_config(file, overrides)
    sections = [name for name in type(cfg).model_fields if name in cfg.model_fields_set]
    click.echo(f"{file}: ok ({', '.join(sections) or 'defaults only'})")


@config.command("match")
@click.argument("micrograph", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--material", required=True, help="Perovskite of the specimen (e.g. SrTiO3).")
@click.option("--zone", type=click.Choice(["001", "110"]), default="001", show_default=True)
@click.option("--pixel-size", "pixel_size", type=click.FloatRange(min=0, min_open=True), help="Å per pixel (overrides the file).")
@click.option("--energy-kev", type=click.FloatRange(60, 300), help="Beam energy (overrides the file).")
@click.option("--convergence-mrad", type=click.FloatRange(min=0, min_open=True), help="Probe semi-angle.")
@click.option("--haadf-mrad", metavar="INNER,OUTER", help="HAADF collection semi-angles, e.g. 60,200.")
@click.option("--abf-mrad", metavar="INNER,OUTER", help="ABF collection semi-angles, e.g. 10,20.")
@click.option("--bf-mrad", metavar="INNER,OUTER", help="BF collection semi-angles, e.g. 0,10.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the config here.")
def config_match(micrograph, material, zone, pixel_size, energy_kev, convergence_mrad, haadf_mrad, abf_mrad,
                 bf_mrad, out) -> None:
    """Print a simulation config matched to MICROGRAPH, with the source of each value."""
    from simulation.matching import match, to_text

    cfg, sources = match(micrograph, material=material, zone=zone, pixel_size_ang=pixel_size, energy_kev=energy_kev,
                         convergence_mrad=convergence_mrad,
                         detectors_mrad={"haadf": haadf_mrad, "abf": abf_mrad, "bf": bf_mrad})
    text = to_text(cfg, sources, micrograph)
    if out is not None:
        from stemnet.atomic import write_atomic

        write_atomic(out, text.encode())
    click.echo(text, nl=False)


# ---------------------------------------------------------------------------- model
def _shape_option(length: int):
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


@cli.group()
def model() -> None:
    """Inspect the network a config describes."""


@model.command("summary")
@click.argument("file", type=ConfigFile("model", "training"))
@click.option("-o", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--input-shape", callback=_shape_option(3), metavar="H,W,C", default="32,32,16",
              show_default=True, help="One input sample, channels-last.")
@click.option("--output-shape", callback=_shape_option(2), metavar="H,W",
              help="Target maps' size  [default: the input's H,W].")
def model_summary_cmd(file, overrides, input_shape, output_shape) -> None:
    """Per-layer parameters, gradient bytes and FLOPs of FILE's model, in backprop order."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.config import load_config
    from stemnet.models import format_summary, model_summary

    cfg = load_config(file, overrides, require=("model",)).model
    click.echo(format_summary(model_summary(cfg, input_shape, output_shape)))


# ------------------------------------------------------------------------- simulate
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
    from stemnet.config import load_config
    from stemnet.ranks import launcher_rank

    if finalize_dir is not None:
        from simulation.generator import CONFIG_NAME, finalize

        cfg_path = Path(config_file) if config_file else finalize_dir / CONFIG_NAME
        cfg = load_config(cfg_path, overrides, require=("simulation",)).simulation
        manifest = finalize(cfg, finalize_dir)
        counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
        click.echo(f"{finalize_dir}: manifest written ({counts})")
        return
    if config_file is None or out is None:
        raise click.UsageError("--config and --out are required (or --finalize DIR)")
    cfg = load_config(config_file, overrides, require=("simulation",)).simulation
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


# ---------------------------------------------------------------------------- train
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


# ------------------------------------------------------------------------- scaling
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
@click.option("--input-shape", callback=_shape_option(3), metavar="H,W,C", default="32,32,16",
              show_default=True, help="One input sample, channels-last.")
@click.option("--output-shape", callback=_shape_option(2), metavar="H,W",
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


# ---------------------------------------------------------------------- reconstruct
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
def calibrate_command(run_dir, data_dir, split, samples) -> None:
    """Calibrate RUN's ensemble uncertainty on a held-out split (writes RUN/uncertainty.json)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.reconstruct import calibrate_uncertainty

    r = calibrate_uncertainty(run_dir, data_dir, split, samples)
    click.echo(f"{run_dir}: variance scale {r.get('variance_scale', float('nan')):.3g} on {r.get('values', 0)} "
               f"{split} values (1-sigma coverage {r.get('coverage_raw', float('nan')):.1%} raw, "
               f"{r.get('coverage_scaled', float('nan')):.1%} scaled) -> {run_dir}/uncertainty.json")


# --------------------------------------------------------------------------- submit
from stemnet.hpc.submit import submit_command  # noqa: E402  (click and YAML only; no TensorFlow)

cli.add_command(submit_command)


# ---------------------------------------------------------------------------- bench
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
@click.option("--input-shape", callback=_shape_option(3), metavar="H,W,C", default="16,16,2", show_default=True)
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
@click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True, help="Held-out micrographs.")
@JSON_OPTION
def bench_sim2real_cmd(run_dir, data_dir, samples, json_path) -> None:
    """Reconstruction of realistic held-out micrographs (0.1 Å, >= 256 px, unseen imperfections) vs truth."""
    import json

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stemnet.reconstruct.benchmark import bench_sim2real, write

    result = bench_sim2real(run_dir, data_dir, samples=samples)
    click.echo(json.dumps(result, indent=1))
    write(result, json_path)


# ----------------------------------------------------------------------------- demo
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


# ----------------------------------------------------------------------------- main
from stemnet.distributed.launch import launch_command  # noqa: E402

cli.add_command(launch_command)


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
