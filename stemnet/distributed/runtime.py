"""Horovod process set-up: environment from the config, then ``hvd.init()``."""

from __future__ import annotations

import os
from typing import Dict

from stemnet.config import DistributedConfig


def horovod_environment(cfg: DistributedConfig) -> Dict[str, str]:
    """The Horovod variables the ``distributed:`` section sets (read by ``hvd.init()``).

    The response cache (``HOROVOD_CACHE_CAPACITY``) is what makes coordination
    decentralized: once every rank has seen a tensor, its allreduce needs no coordinator
    round-trip. It keeps hitting because tensor names are stable from step to step.
    """
    env = {
        "HOROVOD_CACHE_CAPACITY": str(cfg.cache_capacity),
        "HOROVOD_CYCLE_TIME": f"{cfg.cycle_time_ms:g}",
        "HOROVOD_FUSION_THRESHOLD": str(int(cfg.fusion_threshold_mib * 2**20)),
    }
    if cfg.timeline:
        env["HOROVOD_TIMELINE"] = cfg.timeline
        env["HOROVOD_TIMELINE_MARK_CYCLES"] = "1"
    return env


def init_horovod(cfg: DistributedConfig):
    """Set the environment from ``cfg`` (launcher values win) and initialise Horovod."""
    for key, value in horovod_environment(cfg).items():
        os.environ.setdefault(key, value)
    import horovod.tensorflow as hvd

    if not hvd.is_initialized():
        hvd.init()
    return hvd
