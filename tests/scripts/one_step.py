"""Two SGD steps of a small FC-DenseNet per grouping strategy (run plain or under horovodrun).

Usage: python one_step.py OUT_DIR STRATEGY...  — writes OUT_DIR/<strategy>.npz (rank 0):
``init_<i>`` / ``final_<i>`` for every trainable variable and ``losses`` (per step).
Under N ranks, rank r trains on its slice of the same global batches of 8 samples.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import horovod.tensorflow as hvd
import tensorflow as tf

from stemnet.config import DistributedConfig, ModelConfig, TrainConfig
from stemnet.distributed.grouping import make_groups
from stemnet.models import build_model
from stemnet.train.optim import build_optimizer
from stemnet.train.step import make_train_step

GLOBAL_BATCH = 8
STEPS = 2
out_dir, strategies = sys.argv[1], sys.argv[2:]
hvd.init()
rank, world = hvd.rank(), hvd.size()
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
for strategy in strategies:
    tf.keras.utils.set_random_seed(0)  # the same initial weights in every process
    model = build_model(mcfg, (16, 16, 4), (16, 16))
    opt = build_optimizer(tcfg, tcfg.learning_rate)
    opt.build(model.trainable_variables)
    hvd.broadcast_variables(model.variables, root_rank=0)
    init = [v.numpy() for v in model.trainable_variables]
    hcfg = DistributedConfig(grouping=strategy, group_bytes_mib=0.004, first_group_bytes_mib=0.001)
    groups = make_groups(model, strategy, group_bytes=int(hcfg.group_bytes_mib * 2**20),
                         first_group_bytes=int(hcfg.first_group_bytes_mib * 2**20))
    step = tf.Variable(0, dtype=tf.int64)
    skipped = tf.Variable(0, dtype=tf.int64)
    train_step = make_train_step(model, opt, lambda it: tf.constant(tcfg.learning_rate), tcfg, step=step,
                                 skipped=skipped, hvd=hvd, hcfg=hcfg, groups=groups)
    losses = [float(train_step(x, t)["total"]) for x, t in batches]
    ngroups = len(groups) if isinstance(groups, list) else (groups or 0)
    if rank == 0:
        arrays = {f"init_{i}": v for i, v in enumerate(init)}
        arrays.update({f"final_{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
        np.savez(os.path.join(out_dir, strategy.replace(":", "_") + ".npz"), losses=np.array(losses), **arrays)
        print(f"STEP {strategy} groups={ngroups} loss={losses[0]:.6f} skipped={int(skipped.numpy())}", flush=True)
