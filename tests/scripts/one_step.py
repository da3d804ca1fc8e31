"""Two SGD steps of a small FC-DenseNet per grouping strategy (plain, horovodrun or stemnet launch).

Usage: python one_step.py OUT_DIR STRATEGY...  — writes OUT_DIR/<strategy>.npz (rank 0):
``init_<i>`` / ``final_<i>`` for every trainable variable and ``losses`` (per step).
Under N ranks, rank r trains on its slice of the same global batches of 8 samples. The
backend is ``distributed.backend: auto`` (Horovod under horovodrun, MWMS under a
TF_CONFIG launcher) unless STEMNET_BACKEND names one. Under MWMS rank 0 also writes
OUT_DIR/<strategy>.order.json: the gradient collectives of the traced step, in issue order.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf

from stemnet.config import DistributedConfig, ModelConfig, TrainConfig
from stemnet.distributed.backends import init_backend
from stemnet.distributed.grouping import make_groups
from stemnet.models import backprop_order, build_model
from stemnet.train.optim import build_optimizer
from stemnet.train.step import make_train_step

GLOBAL_BATCH = 8
STEPS = 2
out_dir, strategies = sys.argv[1], sys.argv[2:]
# a 4 KB pack budget so that `none` under MWMS (TensorFlow's own packing) makes several packs
backend = init_backend(DistributedConfig(backend=os.environ.get("STEMNET_BACKEND", "auto"), fusion_threshold_mib=0.004))
rank, world = backend.rank, backend.size
rng = np.random.default_rng(1)
batches = []
for _ in range(STEPS):
    x = rng.normal(size=(GLOBAL_BATCH, 16, 16, 4)).astype(np.float32)
    targets = {
        "potential": rng.normal(size=(GLOBAL_BATCH, 16, 16, 1)).astype(np.float32),
        "displacement": rng.normal(scale=0.1, size=(GLOBAL_BATCH, 16, 16, 9)).astype(np.float32),
        "displacement_mask": rng.uniform(size=(GLOBAL_BATCH, 16, 16, 9)).astype(np.float32),
        "weight": np.ones(GLOBAL_BATCH, np.float32),
    }
    local = GLOBAL_BATCH // world
    part = slice(rank * local, (rank + 1) * local)
    batches.append((tf.constant(x[part]), {k: tf.constant(v[part]) for k, v in targets.items()}))
tcfg = TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, loss="mse")
mcfg = ModelConfig(initial_filters=8, growth=4, layers_per_block=[2, 2], bottleneck_layers=2,
                   batch_norm=False, dropout=0.0, coordconv=True)
one = tf.VariableAggregation.ONLY_FIRST_REPLICA
for strategy in strategies:
    tf.keras.utils.set_random_seed(0)  # the same initial weights in every process
    with backend.scope():
        model = build_model(mcfg, (16, 16, 4), (16, 16))
        opt = build_optimizer(tcfg, tcfg.learning_rate)
        opt.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, aggregation=one)
        skipped = tf.Variable(0, dtype=tf.int64, aggregation=one)
    backend.broadcast(model.variables)
    init = [v.numpy() for v in model.trainable_variables]
    hcfg = DistributedConfig(grouping=strategy, group_bytes_mib=0.004, first_group_bytes_mib=0.001)
    groups = make_groups(model, strategy, group_bytes=int(hcfg.group_bytes_mib * 2**20),
                         first_group_bytes=int(hcfg.first_group_bytes_mib * 2**20))
    train_step = make_train_step(model, opt, lambda it: tf.constant(tcfg.learning_rate), tcfg, step=step,
                                 skipped=skipped, backend=backend, groups=groups)
    losses = [float(train_step(x, t)["total"]) for x, t in batches]
    ngroups = len(groups) if isinstance(groups, list) else (groups or 0)
    if rank == 0:
        arrays = {f"init_{i}": v for i, v in enumerate(init)}
        arrays.update({f"final_{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
        np.savez(os.path.join(out_dir, strategy.replace(":", "_") + ".npz"), losses=np.array(losses), **arrays)
        if backend.name == "mwms" and world > 1:  # what the traced step issues, for the order test
            from stemnet.distributed.backends.mwms import collective_sizes

            index = {v.ref(): i for i, v in enumerate(model.trainable_variables)}
            graph = train_step.get_concrete_function(*batches[0]).graph
            with open(os.path.join(out_dir, strategy.replace(":", "_") + ".order.json"), "w") as f:
                json.dump({"issued": backend.issued, "collective_sizes": collective_sizes(graph),
                           "variable_sizes": [int(np.prod(v.shape)) for v in model.trainable_variables],
                           "backprop_layers": [[index[v.ref()] for v in node.variables]
                                               for node in backprop_order(model)]}, f)
        print(f"STEP {strategy} groups={ngroups} loss={losses[0]:.6f} skipped={int(skipped.numpy())}", flush=True)
