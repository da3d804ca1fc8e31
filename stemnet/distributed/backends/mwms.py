"""The MWMS backend: ``tf.distribute.MultiWorkerMirroredStrategy``, one worker per ``TF_CONFIG`` task.

Gradient groups become collectives the way Horovod's ``groups=`` does:

- a group (``layer``, ``graph``, ``count:N``) is one ``replica_context.all_reduce`` over its
  gradients with ``bytes_per_pack=0``, i.e. one packed collective; the groups are issued
  in their list order, which is backprop order, and TensorFlow's collective ordering
  token makes them run in that order;
- ``none`` is TensorFlow's own packing: one ``all_reduce`` over every gradient with
  ``bytes_per_pack = distributed.fusion_threshold_mib``. TensorFlow reverses the variable
  list (the forward order, so roughly backprop order for a chain, but not for skip
  connections), then fills packs until each *exceeds* the budget (packs are at least B,
  the last one smaller), splitting a layer's kernel and bias where the budget falls. Ours
  (``graph``) orders by the layer graph (reverse topological, skip connections
  included), packs *at most* B with a small first group, and never splits a layer.

The optimizer is called with ``skip_gradients_aggregation=True``: the gradients are
already averaged, and tf_keras would otherwise all-reduce them a second time.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from stemnet.config import DistributedConfig
from stemnet.distributed.backends import Backend
from stemnet.errors import UserError

_STRATEGY = None  # one per process: TensorFlow allows a single collective set-up


def strategy_for_process():
    """The process's MultiWorkerMirroredStrategy, created on first use.

    ``TF_CONFIG`` comes from the launcher (``stemnet launch``) or is built here from the
    Slurm or LSF variables (:mod:`stemnet.distributed.tfconfig`); without either the
    process is a single worker.
    """
    global _STRATEGY
    if _STRATEGY is None:
        from stemnet.distributed.tfconfig import tf_config_from_environment

        if "TF_CONFIG" not in os.environ:
            config = tf_config_from_environment()
            if config is not None:
                os.environ["TF_CONFIG"] = json.dumps(config)
        _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    return _STRATEGY


COLLECTIVE_REDUCE_OPS = ("CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3")


def collective_sizes(graph) -> List[int]:
    """Element counts of the all-reduce collectives in a traced step, in issue order.

    A packed group is one collective over the concatenation of its flattened gradients.
    Collectives of one function share an ordering token, so TensorFlow runs them in the
    order they were created, which is the order of ``graph.get_operations()``.
    """
    sizes = []
    for op in graph.get_operations():
        if op.type in COLLECTIVE_REDUCE_OPS:
            sizes.append(int(op.inputs[0].shape.num_elements()))
    return sizes


def group_indices(groups, variables: Sequence) -> List[List[int]]:
    """Variable indices per collective, in issue order (None: one list of all)."""
    n = len(variables)
    if groups is None:
        return [list(range(n))]
    if isinstance(groups, int):  # Horovod's split of the variable list into N chunks
        return [[int(i) for i in chunk] for chunk in np.array_split(np.arange(n), groups) if len(chunk)]
    position = {v.ref(): i for i, v in enumerate(variables)}
    return [[position[v.ref()] for v in group] for group in groups]


def _on_replica(tensor):
    """``tensor`` placed on the current replica's device (inside ``strategy.run``).

    On CPU workers ``ReplicaContext.all_reduce`` goes through ``merge_call`` and reduces
    each value *to its own device* (``tensor.device``). A tensor that enters
    ``strategy.run`` as an argument of a ``tf.function`` (a graph placeholder) has no
    device, and TensorFlow refuses it with "destinations can not be empty"; an identity
    made inside the replica function is placed on the replica's device.
    """
    return tf.nest.map_structure(tf.identity, tensor)


class MWMSBackend(Backend):
    """Workers from ``TF_CONFIG``; one replica (device) per worker, like one Horovod rank per GPU."""

    name = "mwms"
    collective_reads = True
    apply_options = {"skip_gradients_aggregation": True}

    def __init__(self, cfg: DistributedConfig):
        if cfg.op == "adasum":
            raise UserError("distributed.op: adasum needs the horovod backend; expected average with mwms")
        self.strategy = strategy_for_process()
        devices = self.strategy.extended.worker_devices
        if len(devices) != 1:
            raise UserError(f"distributed.backend mwms: this worker sees {len(devices)} devices {list(devices)}; "
                            "expected one per worker (give each task one GPU, e.g. srun --gpus-per-task=1)")
        resolver = self.strategy.cluster_resolver
        self.rank = int(resolver.task_id or 0) if resolver is not None else 0
        self.size = int(self.strategy.num_replicas_in_sync)
        self.compression = cfg.compression
        self.predivide = float(cfg.gradient_predivide_factor)
        self.pack_bytes = int(cfg.fusion_threshold_mib * 2**20)
        self._mean_fn = tf.function(self._mean_replica)
        self.issued: List[List[int]] = []  # variable indices per collective call, as last traced

    def scope(self):
        return self.strategy.scope()

    def run(self, fn, *args):
        return self.strategy.run(fn, args=args)

    def gradients(self, tape, objective, variables: Sequence, groups):
        """Gradients averaged over the workers, one packed collective per group, in order."""
        grads = list(tape.gradient(objective, variables))
        if self.size == 1:
            return grads
        ctx = tf.distribute.get_replica_context()
        sum_op = tf.distribute.ReduceOp.SUM
        pack = tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=self.pack_bytes if groups is None else 0)
        self.issued = []
        for indices in group_indices(groups, variables):
            indices = [i for i in indices if grads[i] is not None]
            if not indices:
                continue
            self.issued.append(indices)
            values = [grads[i] / self.predivide if self.predivide != 1 else grads[i] for i in indices]
            dtypes = [v.dtype for v in values]
            if self.compression == "fp16":  # what hvd.Compression.fp16 does: reduce in half precision
                values = [tf.cast(v, tf.float16) if v.dtype.is_floating else v for v in values]
            reduced = ctx.all_reduce(sum_op, values, options=pack)
            scale = self.predivide / self.size
            for i, value, dtype in zip(indices, reduced, dtypes):
                grads[i] = tf.cast(value, dtype) * tf.cast(scale, dtype)
        return grads

    def all_sum(self, tensor, name: str):
        if self.size == 1:
            return tensor
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, _on_replica(tensor))

    def broadcast(self, variables: Sequence) -> None:
        """Rank 0's values to every worker: a sum where only rank 0 contributes."""
        # floating-point state only: all_reduce packs its list into one tensor (no mixed
        # dtypes), and the integer counters (the optimizer's step) are equal on every worker
        # already: all start at 0 or restore the same checkpoint
        variables = [v for v in variables if v.dtype.is_floating]
        if self.size == 1 or not variables:
            return
        keep = tf.constant(1 if self.rank == 0 else 0)

        def contribute():
            ctx = tf.distribute.get_replica_context()
            mine = [tf.cast(keep, v.dtype) * tf.identity(v) for v in variables]
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine)

        @tf.function
        def broadcast_all():
            values = self.strategy.run(contribute)
            for v, value in zip(variables, values):
                v.assign(value)

        broadcast_all()

    def _mean_replica(self, vector):
        def mean(x):
            # x is the tf.function's argument, a tensor without a device: place it first
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, _on_replica(x))

        return self.strategy.run(mean, args=(vector,))

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        if self.size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        out = self._mean_fn(tf.constant([float(values[k]) for k in keys], tf.float32)).numpy()
        return {k: float(v) for k, v in zip(keys, out)}

    def barrier(self) -> None:
        if self.size > 1:
            self._mean_fn(tf.zeros([1], tf.float32)).numpy()
