"""Benchmarks: ratios measured side by side in one run, on the same data.

Each function returns a dict (the ``--json`` payload) whose ``ratio_*`` keys are the
figures the README reports. Nothing here asserts a speed: tests do not time things.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def _rate(fn, count: int, repeats: int = 3) -> float:
    """Best of ``repeats``: ``count`` items / seconds of ``fn()``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


# ----------------------------------------------------------------------- simulate
def bench_simulate(config=REPO / "configs/simulation/bench.yaml", samples: int = 4, naive_grid=(2, 2)) -> dict:
    """CBED patterns/s of the generator vs a bare scipy.fft multislice loop and naive abTEM.

    All three run single-threaded in this process on the same specimen, grid and slices;
    the generator's rate includes the potential, the labels and the shard-ready arrays.
    The naive rate is per pattern on a ``naive_grid`` subset (one multislice call each).
    """
    from simulation import multislice
    from simulation.generator import draw_specimen, simulate_sample
    from stemnet.config import load_config

    cfg = load_config(config, require=("simulation",)).simulation
    gx, gy = cfg.cbed.grid
    specimen, _ = draw_specimen(cfg, 0)
    common = dict(energy_ev=cfg.microscope.energy_ev, convergence_mrad=cfg.microscope.convergence_mrad,
                  fov_ang=((0, 0), (cfg.fov_ang, cfg.fov_ang)), k=cfg.cbed.k,
                  max_angle_mrad=cfg.cbed.max_angle_mrad, sampling_ang=cfg.sampling_ang,
                  slice_thickness_ang=specimen.params["a"] / 2)
    simulate_sample(cfg, 0)  # warm-up: numba compilation, FFTW plans
    ours = _rate(lambda: [simulate_sample(cfg, i) for i in range(samples)], samples * gx * gy, repeats=2)
    floor = _rate(lambda: multislice.fft_floor_cbed(specimen.atoms, grid=(gx, gy), **common), gx * gy, repeats=2)
    nx, ny = naive_grid
    naive = _rate(lambda: multislice.naive_abtem_cbed(specimen.atoms, grid=(nx, ny), **common), nx * ny, repeats=1)
    return {
        "config": str(config),
        "grid": [gx, gy], "k": cfg.cbed.k, "slices": int(round(specimen.params["m"] * 2)),
        "generator_patterns_per_s": ours,
        "fft_floor_patterns_per_s": floor,
        "naive_abtem_patterns_per_s": naive,
        "ratio_vs_fft_floor": ours / floor,
        "ratio_vs_naive_abtem": ours / naive,
    }


# ---------------------------------------------------------------------------- train
def _cached_batches(data_dir, cfg, n: int):
    import tensorflow as tf

    from stemnet.data import make_dataset

    ds = make_dataset(data_dir, "train", batch_size=cfg.train.batch_size, targets=cfg.data.targets,
                      shuffle=True, repeat=True, augment=False)
    return list(ds.take(n)), tf


def bench_train(data_dir, config=REPO / "configs/training/demo.yaml", steps: int = 30,
                compare: bool = True) -> dict:
    """samples/s of our training step vs Keras ``model.fit`` (same model, data, batch),
    and of our step in mixed_bfloat16 vs float32 (``compare=False``: our float32 step
    only). Batches are decoded once and cached in memory so that only the step is timed."""
    from stemnet.config import load_config
    from stemnet.models import build_model
    from stemnet.train.loop import data_info
    from stemnet.shards import read_manifest
    from stemnet.train.optim import build_optimizer
    from stemnet.train.step import make_train_step

    cfg = load_config(config, require=("model", "train"))
    info = data_info(read_manifest(data_dir), cfg.data.targets)
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
        return _rate(lambda: run(steps), steps * batch)

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
        return _rate(lambda: model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0), steps * batch)

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


# ----------------------------------------------------------------------------- data
def synthetic_dataset(root, config=REPO / "configs/simulation/bench.yaml", samples: int = 672,
                      shards: int = 2, seed: int = 0) -> Path:
    """A dataset with the field shapes of a simulation config (default: 8x8 probe grid of
    32x32 CBED patterns, 32x32 label maps: 315 KB per sample), written through the real
    shard writer but filled with seeded random numbers instead of simulations, for
    input-pipeline throughput at a realistic record size (the contents do not matter to
    it: LMDB does not compress). Returns ``root``.
    """
    import numpy as np

    from simulation.generator import fields as field_specs
    from simulation.generator import param_names
    from stemnet.config import load_config
    from stemnet.shards import ShardWriter, finalize_manifest, shard_path

    cfg = load_config(config, require=("simulation",)).simulation
    specs = field_specs(cfg)
    names = param_names(cfg)
    rng = np.random.default_rng(seed)
    meta = {"generator": "stemnet.bench.synthetic", "generator_version": "1", "config_digest": "synthetic",
            "seed": seed}
    per_shard = -(-samples // shards)
    record = sum(int(np.prod(s.shape)) * 4 for s in specs.values())
    for k in range(shards):
        first, last = k * per_shard, min(samples, (k + 1) * per_shard)
        with ShardWriter(shard_path(root, "train", k), specs, names, meta, txn_samples=16,
                         map_size=2 * record * (last - first) + (1 << 20)) as writer:
            for index in range(first, last):
                sample = {name: rng.random(spec.shape, dtype=np.float32) for name, spec in specs.items()}
                writer.write(index, sample, rng.random(len(names)))
    finalize_manifest(root, extra={"simulation": cfg.model_dump(mode="json"), "param_names": names})
    return Path(root)


def bench_data_pipeline(data_dir, config=REPO / "configs/training/demo.yaml", batches: int = 200,
                        train_step_rate: Optional[float] = None, large: bool = True,
                        large_batches: int = 40, tmpdir=None) -> dict:
    """The input pipeline vs a raw LMDB read, an h5py file, and the training step, from
    the page cache and from disk; on ``data_dir`` and (``large``) on a synthetic dataset
    of 315 KB records (:func:`synthetic_dataset`) with as many samples as are read."""
    import tempfile

    from stemnet.config import load_config
    from stemnet.data import bench_data, close_shards

    cfg = load_config(config, require=("model", "train"))
    common = dict(batch_size=cfg.train.batch_size, augment=cfg.data.augment, verify_crc=cfg.data.verify_crc,
                  cold=True, tmpdir=tmpdir)
    if train_step_rate is None:
        train_step_rate = bench_train(data_dir, config, steps=20, compare=False)["ours_float32_samples_per_s"]
    result = bench_data(data_dir, batches=batches, train_step_rate=train_step_rate, **common)
    if large:
        with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
            root = synthetic_dataset(Path(tmp) / "large", samples=(large_batches + 2) * cfg.train.batch_size)
            step = bench_train(root, config, steps=10, compare=False)["ours_float32_samples_per_s"]
            result["large"] = bench_data(root, batches=large_batches, train_step_rate=step, **common)
            close_shards(root)
    return result


# ------------------------------------------------------------------------- grouping
def _steptime(np_ranks: int, model_config, input_shape, batch, steps, strategies, backend: str = "horovod") -> list:
    cmd = [sys.executable, "-m", "stemnet.distributed.steptime", "--model", str(model_config),
           "--input-shape", ",".join(map(str, input_shape)), "--batch", str(batch), "--steps", str(steps),
           "--backend", backend, *strategies]
    if np_ranks > 1 and backend == "horovod":
        horovodrun = str(Path(sys.executable).parent / "horovodrun")
        cmd = [horovodrun, "-np", str(np_ranks), "-H", f"localhost:{np_ranks}", "--gloo"] + cmd
    elif np_ranks > 1:
        cmd = [sys.executable, "-m", "stemnet.cli", "launch", "-n", str(np_ranks), "--"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"steptime ({backend}) on {np_ranks} rank(s) failed: {proc.stderr[-2000:]}")
    rows = []
    for line in proc.stdout.splitlines():
        start = line.find("{")
        if start >= 0 and '"strategy"' in line:
            rows.append(json.loads(line[start:]))
    return rows


def bench_grouping(config=REPO / "configs/training/demo.yaml", input_shape=(16, 16, 2), batch: int = 16,
                   steps: int = 20, strategies=("none", "count:4", "layer", "graph"), backends=None) -> dict:
    """2 ranks: step time per strategy relative to ``none``, and 2 vs 1 rank, per backend.

    ``backends`` defaults to every installed one (horovod over Gloo, mwms over gRPC), run
    one after the other in this call; Horovod's keys are unprefixed, the others carry
    their name (``mwms_ratio_graph_vs_none``, ``mwms_efficiency_np2``).
    """
    from stemnet.distributed.backends import horovod_available

    backends = backends or (["horovod", "mwms"] if horovod_available() else ["mwms"])
    result = {"config": str(config), "input_shape": list(input_shape), "batch_per_rank": batch,
              "backends": list(backends)}
    for backend in backends:
        prefix = "" if backend == "horovod" else f"{backend}_"
        two = {r["strategy"]: r for r in _steptime(2, config, input_shape, batch, steps, strategies, backend)}
        one = {r["strategy"]: r for r in _steptime(1, config, input_shape, batch, steps, ["none"], backend)}
        result[prefix + "np2"], result[prefix + "np1"] = two, one
        for strategy in strategies:
            if strategy != "none":
                key = prefix + "ratio_" + strategy.replace(":", "") + "_vs_none"
                result[key] = two[strategy]["step_s"] / two["none"]["step_s"]
        best = min(two.values(), key=lambda r: r["step_s"])
        result[prefix + "efficiency_np2"] = two["none"]["samples_per_s"] / (2 * one["none"]["samples_per_s"])
        result[prefix + "efficiency_np2_best"] = best["samples_per_s"] / (2 * one["none"]["samples_per_s"])
        result[prefix + "best_strategy"] = best["strategy"]
    return result


def write(result: dict, path: Optional[Path]) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
