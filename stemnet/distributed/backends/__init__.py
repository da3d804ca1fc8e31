"""Distributed backends behind one interface: the training loop never knows which one runs it.

A backend owns the processes and the collectives the loop needs:

- ``rank`` / ``size``: this process and how many there are;
- ``scope()``: where the model, optimizer and counters are created (MWMS mirrors them);
- ``run(fn, *args)``: call ``fn`` where gradients are reduced (MWMS: one replica per worker);
- ``gradients(tape, objective, variables, groups)``: the gradients averaged over the ranks,
  one collective per group, issued in the groups' (backprop) order;
- ``averages``: True when ``gradients`` averages (False for Horovod's Adasum);
- ``apply_options``: extra ``apply_gradients`` keywords (MWMS: the optimizer must not
  aggregate again);
- ``all_sum(tensor, name)``: a tensor summed over the ranks, inside ``run`` (in the step);
- ``broadcast(variables)``: rank 0's values to every rank;
- ``mean(values)``: a dict of Python floats averaged over the ranks (validation losses);
- ``barrier()``; ``collective_reads``: True when reading some variables is itself a
  collective (MWMS on-read-synchronised batch-norm statistics), so every rank must take
  part in a checkpoint or an export.

``distributed.backend: auto`` picks Horovod when it imports, else MWMS; a process started
by a tf.distribute launcher (``TF_CONFIG`` set, as ``stemnet launch`` does) gets MWMS.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, Sequence

from stemnet.config import DistributedConfig
from stemnet.errors import UserError

BACKENDS = ("horovod", "mwms")


class Backend:
    """The interface; ``horovod`` and ``mwms`` implement it."""

    name = "base"
    rank = 0
    size = 1
    collective_reads = False
    averages = True  # gradients(...) returns the mean over the ranks (False: Horovod's Adasum)
    apply_options: Dict[str, object] = {}

    def scope(self):
        raise NotImplementedError

    def run(self, fn, *args):
        raise NotImplementedError

    def gradients(self, tape, objective, variables: Sequence, groups):
        raise NotImplementedError

    def all_sum(self, tensor, name: str):
        raise NotImplementedError

    def broadcast(self, variables: Sequence) -> None:
        raise NotImplementedError

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


class LocalBackend(Backend):
    """One process, no collectives (benchmarks and tools that train without a launcher)."""

    name = "local"

    def scope(self):
        import contextlib

        return contextlib.nullcontext()

    def run(self, fn, *args):
        return fn(*args)

    def gradients(self, tape, objective, variables, groups):
        return tape.gradient(objective, variables)

    def all_sum(self, tensor, name: str):
        return tensor

    def broadcast(self, variables) -> None:
        pass

    def mean(self, values):
        return dict(values)

    def barrier(self) -> None:
        pass


def horovod_available() -> bool:
    """True when Horovod is installed (it is not part of the modern stack)."""
    return importlib.util.find_spec("horovod") is not None


def resolve_backend(name: str) -> str:
    """``auto`` -> ``horovod`` when it imports (and no TF_CONFIG is set), else ``mwms``."""
    if name == "auto":
        return "horovod" if horovod_available() and "TF_CONFIG" not in os.environ else "mwms"
    if name == "horovod" and not horovod_available():
        raise UserError("distributed.backend: horovod is not installed in this environment (the modern "
                        "stack has none); expected auto or mwms")
    if name not in BACKENDS:
        raise UserError(f"distributed.backend: expected auto, horovod or mwms, got {name!r}")
    return name


def init_backend(cfg: DistributedConfig) -> Backend:
    """Set up the configured backend for this process (once per process)."""
    name = resolve_backend(cfg.backend)
    if name == "horovod":
        from stemnet.distributed.backends.horovod import HorovodBackend

        return HorovodBackend(cfg)
    from stemnet.distributed.tfconfig import tf_config_from_environment

    if "TF_CONFIG" not in os.environ and tf_config_from_environment() is None:
        return LocalBackend()  # MWMS with a single worker is one process: no strategy needed
    from stemnet.distributed.backends.mwms import MWMSBackend

    return MWMSBackend(cfg)
