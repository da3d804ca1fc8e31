"""``stemnet info``: versions and capabilities of this installation."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path

import click

from stemnet import __version__
from stemnet.cli.app import cli


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
