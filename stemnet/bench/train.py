"""``bench train``: our training step against Keras ``model.fit``, and bf16 against fp32."""

from __future__ import annotations

from stemnet.bench.common import rate, shipped


def _cached_batches(data_dir, cfg, n: int):
    import tensorflow as tf

    from stemnet.data import make_dataset

    ds = make_dataset(data_dir, "train", batch_size=cfg.train.batch_size, targets=cfg.data.targets,
                      shuffle=True, repeat=True, augment=False)
    return list(ds.take(n)), tf


def bench_train(data_dir, config=None, steps: int = 30,
                compare: bool = True) -> dict:
    """samples/s of our training step vs Keras ``model.fit`` (same model, data, batch),
    and of our step in mixed_bfloat16 vs float32 (``compare=False``: our float32 step
    only). Batches are decoded once and cached in memory so that only the step is timed."""
    from stemnet.config import load_config
    from stemnet.models import build_model
    from stemnet.train.rundata import RunData
    from stemnet.shards import read_manifest
    from stemnet.train.optim import build_optimizer
    from stemnet.train.step import make_train_step

    config = config or shipped("training/demo.yaml")
    cfg = load_config(config, require=("model", "train"))
    info = RunData.from_manifest(read_manifest(data_dir), cfg.data.targets).model_dump(mode="json")
    batches, tf = _cached_batches(data_dir, cfg, 8)
    batch = cfg.train.batch_size
    shapes = (tuple(info["input_shape"]), tuple(info["output_shape"]))

    def ours(policy: str) -> float:
        tf.keras.mixed_precision.set_global_policy(policy)
        tf.keras.utils.set_random_seed(0)
        model = build_model(cfg.model, *shapes)
        tcfg = cfg.train.model_copy(update={"precision": policy})
        opt = build_optimizer(tcfg, tcfg.learning_rate)
        opt.build(model.trainable_variables)
        step = make_train_step(model, opt, lambda it: tf.constant(tcfg.learning_rate), tcfg,
                               step=tf.Variable(0, dtype=tf.int64), skipped=tf.Variable(0, dtype=tf.int64))

        def run(n):
            for i in range(n):
                x, y = batches[i % len(batches)]
                losses = step(x, y)
            float(losses["total"])

        run(3)
        return rate(lambda: run(steps), steps * batch)

    def keras_fit() -> float:
        tf.keras.mixed_precision.set_global_policy("float32")
        tf.keras.utils.set_random_seed(0)
        model = build_model(cfg.model, *shapes)
        model.compile(optimizer=tf.keras.optimizers.Adam(cfg.train.learning_rate),
                      loss={head: "mse" for head in cfg.model.heads},
                      loss_weights=dict(cfg.train.head_weights))
        xs = tf.concat([x for x, _ in batches], 0)
        ys = {h: tf.concat([y[h] for _, y in batches], 0) for h in cfg.model.heads}
        data = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(batch).repeat()
        model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)
        return rate(lambda: model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0), steps * batch)

    if not compare:
        return {"config": str(config), "batch": batch, "input_shape": list(shapes[0]),
                "ours_float32_samples_per_s": ours("float32")}
    fit = keras_fit()
    fp32 = ours("float32")
    bf16 = ours("mixed_bfloat16")
    tf.keras.mixed_precision.set_global_policy("float32")
    return {
        "config": str(config), "batch": batch, "input_shape": list(shapes[0]),
        "ours_float32_samples_per_s": fp32, "keras_fit_samples_per_s": fit,
        "ours_bfloat16_samples_per_s": bf16,
        "ratio_vs_keras_fit": fp32 / fit,
        "ratio_bf16_vs_fp32": bf16 / fp32,
    }
