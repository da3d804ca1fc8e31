"""Step time of the training step per gradient-grouping strategy, on however many ranks.

``python -m stemnet.distributed.steptime --model CONFIG --input-shape H,W,C --batch B
--steps N [--backend auto|horovod|mwms|local] STRATEGY...`` (plain, under ``horovodrun``, or
under ``stemnet launch``) prints one JSON line per strategy from rank 0:
``{"strategy", "backend", "world", "groups", "step_s", "samples_per_s"}``. The same
synthetic batch on every rank; the median of N timed steps after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def measure(model_config: str, input_shape, batch: int, steps: int, strategies, *, quiet: bool = False,
            backend: str = "auto") -> list:
    import numpy as np
    import tensorflow as tf

    from stemnet.config import TrainConfig, load_config
    from stemnet.distributed.backends import LocalBackend, init_backend
    from stemnet.distributed.grouping import make_groups
    from stemnet.models import build_model
    from stemnet.train.optim import build_optimizer
    from stemnet.train.step import make_train_step

    cfg = load_config(model_config, require=("model",))
    # "local": the same step without any collective (what each rank computes on its own)
    dist = LocalBackend() if backend == "local" else init_backend(cfg.distributed.model_copy(update={"backend": backend}))
    h, w, c = input_shape
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, h, w, c)).astype(np.float32))
    targets = {"weight": tf.ones(batch)}
    for head, channels in cfg.model.heads.items():
        targets[head] = tf.constant(rng.normal(size=(batch, h, w, channels)).astype(np.float32))
    tcfg = TrainConfig(optimizer="adam", learning_rate=1e-3)
    results = []
    for strategy in strategies:
        tf.keras.utils.set_random_seed(0)
        with dist.scope():
            model = build_model(cfg.model, (h, w, c), (h, w))
            opt = build_optimizer(tcfg, tcfg.learning_rate)
            opt.build(model.trainable_variables)
            one = tf.VariableAggregation.ONLY_FIRST_REPLICA
            step, skipped = tf.Variable(0, dtype=tf.int64, aggregation=one), tf.Variable(0, dtype=tf.int64, aggregation=one)
        hcfg = cfg.distributed.model_copy(update={"grouping": strategy})
        groups = make_groups(model, strategy, group_bytes=int(hcfg.group_bytes_mib * 2**20),
                             first_group_bytes=int(hcfg.first_group_bytes_mib * 2**20))
        train_step = make_train_step(model, opt, lambda it: tf.constant(1e-3), tcfg, step=step, skipped=skipped,
                                     backend=dist, groups=groups)
        times = []
        for i in range(3 + steps):
            t0 = time.perf_counter()
            losses = train_step(x, targets)
            float(losses["total"])  # wait for the step
            if i >= 3:
                times.append(time.perf_counter() - t0)
        step_s = float(np.median(times))
        ngroups = len(groups) if isinstance(groups, list) else groups
        results.append({"strategy": strategy, "backend": dist.name, "world": dist.size, "groups": ngroups,
                        "step_s": step_s, "samples_per_s": batch * dist.size / step_s})
    if dist.rank == 0 and not quiet:
        for row in results:
            print(json.dumps(row), flush=True)
    return results


def main(argv=None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads; only when run as a program
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-shape", default="16,16,2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto", choices=["auto", "horovod", "mwms", "local"])
    parser.add_argument("strategies", nargs="+")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    measure(args.model, shape, args.batch, args.steps, args.strategies, backend=args.backend)


if __name__ == "__main__":
    main()
