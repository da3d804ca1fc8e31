"""Which rank am I, out of how many: from Horovod if initialised, else the launcher (or TF_CONFIG)."""

from __future__ import annotations

import os
import sys
from typing import Mapping, NamedTuple

# (rank variable, size variable) per launcher, in the order they are tried; the one list
# (stemnet.hpc renders job scripts from it too).
RANK_VARIABLES = {
    "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI, horovodrun with MPI
    "pmix": ("PMIX_RANK", "PMIX_SIZE"),  # PMIx launchers
    "jsrun": ("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE"),  # jsrun on LSF (Summit)
    "srun": ("SLURM_PROCID", "SLURM_NTASKS"),  # srun on Slurm
    "horovodrun": ("HOROVOD_RANK", "HOROVOD_SIZE"),  # horovodrun --gloo
}
LAUNCHER_VARIABLES = tuple(RANK_VARIABLES.values())


class RankInfo(NamedTuple):
    rank: int
    world: int
    source: str  # "horovod", the rank variable's name, or "default"


def _horovod_rank() -> RankInfo | None:
    """Rank/world from Horovod, only if it is imported *and* initialised."""
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is None:
        return None
    try:
        if hvd.is_initialized():
            return RankInfo(hvd.rank(), hvd.size(), "horovod")
    except (ValueError, AttributeError):
        pass
    return None


def launcher_rank(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Rank/world from the launcher's environment variables, else 0/1.

    A size variable that is missing defaults to rank + 1 would be wrong, so a rank
    variable without its size twin is treated as world size unknown (= 1 is refused):
    it raises ``ValueError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    for rank_var, size_var in LAUNCHER_VARIABLES:
        if rank_var not in env:
            continue
        try:
            rank = int(env[rank_var])
        except ValueError:
            raise ValueError(f"{rank_var}={env[rank_var]!r}: expected an integer rank") from None
        if size_var not in env:
            raise ValueError(f"{rank_var} is set but {size_var} is not: cannot tell the world size")
        try:
            world = int(env[size_var])
        except ValueError:
            raise ValueError(f"{size_var}={env[size_var]!r}: expected an integer world size") from None
        if not 0 <= rank < world:
            raise ValueError(f"{rank_var}={rank} with {size_var}={world}: expected 0 <= rank < size")
        return RankInfo(rank, world, rank_var)
    from stemnet.distributed.tfconfig import tf_config_task  # `stemnet launch` sets only TF_CONFIG

    task = tf_config_task(env)
    if task is not None:
        return RankInfo(task["rank"], task["world"], "TF_CONFIG")
    return RankInfo(0, 1, "default")


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Horovod's rank/world when initialised, else the launcher's, else 0/1."""
    return _horovod_rank() or launcher_rank(environ)
