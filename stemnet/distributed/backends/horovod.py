"""The Horovod backend: ``hvd.init()``, DistributedGradientTape with the gradient groups."""

from __future__ import annotations

import contextlib
from typing import Dict, Sequence

import tensorflow as tf

from stemnet.config import DistributedConfig
from stemnet.distributed.backends import Backend
from stemnet.distributed.runtime import init_horovod


class HorovodBackend(Backend):
    """One rank per process (``horovodrun``, ``jsrun``, ``srun``); Gloo, MPI or NCCL inside."""

    name = "horovod"

    def __init__(self, cfg: DistributedConfig):
        self.hvd = hvd = init_horovod(cfg)
        self.rank, self.size = hvd.rank(), hvd.size()
        self.averages = cfg.op == "average"
        self.tape_options = dict(
            compression=hvd.Compression.fp16 if cfg.compression == "fp16" else hvd.Compression.none,
            op=hvd.Adasum if cfg.op == "adasum" else hvd.Average,
            gradient_predivide_factor=cfg.gradient_predivide_factor,
        )

    def scope(self):
        return contextlib.nullcontext()

    def run(self, fn, *args):
        return fn(*args)

    def gradients(self, tape, objective, variables: Sequence, groups):
        """Horovod's DistributedGradientTape: ``groups`` None (its fusion), N, or lists."""
        if self.size > 1:
            tape = self.hvd.DistributedGradientTape(tape, groups=groups, **self.tape_options)
        return tape.gradient(objective, variables)

    def all_sum(self, tensor, name: str):
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name) if self.size > 1 else tensor

    def broadcast(self, variables: Sequence) -> None:
        if self.size > 1:
            self.hvd.broadcast_variables(list(variables), root_rank=0)

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        if self.size == 1:
            return dict(values)
        return {k: float(self.hvd.allreduce(tf.constant(v), name=f"mean_{k}", op=self.hvd.Average))
                for k, v in values.items()}

    def barrier(self) -> None:
        if self.size > 1:  # horovod.tensorflow 0.28 has no barrier(): a tiny allreduce waits for every rank
            self.hvd.allreduce(tf.constant(0.0), name="barrier", op=self.hvd.Sum)
