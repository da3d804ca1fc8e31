"""Two SGD steps with padded batches, run plain (1 process) or under horovodrun -np 2.

Usage: python padded_step.py OUT_DIR MODE, MODE one of

- ``uneven``: 6 real samples. 2 ranks: rank 0 holds samples 0-3, rank 1 samples 4-5 plus
  2 padding rows (weight 0, wild values). 1 process: the 6 real samples, no padding.
- ``allpad``: 2 ranks: rank 0 holds samples 0-3, rank 1 only padding. 1 process: samples 0-3.
- ``nan``: 2 ranks as ``uneven``, but one real input pixel of rank 1 is NaN (first step only).

Writes OUT_DIR/MODE-rank<r>.npz: ``init_<i>``, ``final_<i>``, ``losses``, ``skipped``.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf

from stemnet.config import DistributedConfig, ModelConfig, TrainConfig
from stemnet.distributed.backends import init_backend
from stemnet.models import build_model
from stemnet.train.optim import build_optimizer
from stemnet.train.step import make_train_step

out_dir, mode = sys.argv[1], sys.argv[2]
backend = init_backend(DistributedConfig(backend=os.environ.get("STEMNET_BACKEND", "auto"), grouping="none"))
rank, world = backend.rank, backend.size
rng = np.random.default_rng(7)


def samples(n):
    return (rng.normal(size=(n, 16, 16, 4)).astype(np.float32),
            {"potential": rng.normal(size=(n, 16, 16, 1)).astype(np.float32),
             "displacement": rng.normal(scale=0.1, size=(n, 16, 16, 9)).astype(np.float32),
             "displacement_mask": rng.uniform(size=(n, 16, 16, 9)).astype(np.float32)})


def rows(x, t, idx, weight):
    idx = np.asarray(idx)
    return x[idx], {**{k: v[idx] for k, v in t.items()}, "weight": np.full(len(idx), weight, np.float32)}


def cat(*parts):
    return (np.concatenate([p[0] for p in parts]),
            {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]})


batches = []
for step_no in range(2):
    x, t = samples(6)
    wild = (100 * x[:2] + 50, {k: 100 * v[:2] + 50 for k, v in t.items()})  # what padding holds must not matter
    first, rest = rows(x, t, range(4), 1.0), rows(x, t, range(4, 6), 1.0)
    pad2 = rows(*wild, range(2), 0.0)
    pad4 = rows(*cat((wild[0], wild[1]), (wild[0], wild[1])), range(4), 0.0)
    if world == 1:
        batch = cat(first, rest) if mode == "uneven" else first
    elif rank == 0:
        batch = first
    else:
        batch = pad4 if mode == "allpad" else cat(rest, pad2)
        if mode == "nan" and step_no == 0:
            batch[0][0, 3, 5, 1] = np.nan
    batches.append((tf.constant(batch[0]), {k: tf.constant(v) for k, v in batch[1].items()}))

tcfg = TrainConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, loss="mse")
mcfg = ModelConfig(initial_filters=8, growth=4, layers_per_block=[2, 2], bottleneck_layers=2,
                   batch_norm=False, dropout=0.0, coordconv=False)  # batch statistics would see the padding
tf.keras.utils.set_random_seed(0)
with backend.scope():
    model = build_model(mcfg, (16, 16, 4), (16, 16))
    opt = build_optimizer(tcfg, tcfg.learning_rate)
    opt.build(model.trainable_variables)
    one = tf.VariableAggregation.ONLY_FIRST_REPLICA
    step, skipped = tf.Variable(0, dtype=tf.int64, aggregation=one), tf.Variable(0, dtype=tf.int64, aggregation=one)
backend.broadcast(model.variables)
init = [v.numpy() for v in model.trainable_variables]
train_step = make_train_step(model, opt, lambda it: tf.constant(tcfg.learning_rate), tcfg, step=step, skipped=skipped,
                             backend=backend, groups=None)
losses, after_first = [], None
for i, (x, t) in enumerate(batches):
    losses.append(float(train_step(x, t)["total"]))
    if i == 0:
        after_first = [v.numpy() for v in model.trainable_variables]
arrays = {f"init_{i}": v for i, v in enumerate(init)}
arrays.update({f"first_{i}": v for i, v in enumerate(after_first)})
arrays.update({f"final_{i}": v.numpy() for i, v in enumerate(model.trainable_variables)})
np.savez(os.path.join(out_dir, f"{mode}-rank{rank}.npz"), losses=np.array(losses), skipped=int(skipped.numpy()),
         **arrays)
