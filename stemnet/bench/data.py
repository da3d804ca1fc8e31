"""``bench data``: the input pipeline against a raw LMDB read, h5py, and the training
step, on the same records in the same order (ratios measured side by side)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np

from stemnet.bench.common import shipped
from stemnet.data import BatchLoader, close_shards, dataset_loader, epoch_order, make_dataset
from stemnet.data.loader import aligned
from stemnet.shards import (
    CRC32_BACKEND,
    RECORD_HEADER,
    crc32,
    header_fields,
    read_manifest,
    reading,
    sample_key,
    shared_env,
)


def _evict(files: Iterable[Path]) -> None:
    """Drop files from the page cache (``posix_fadvise(DONTNEED)``; unprivileged)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _time_pipeline(ds, warm: int, batches: Optional[int], seconds: Optional[float]) -> Tuple[int, float]:
    it = iter(ds)
    for _ in range(warm):
        next(it)
    done, start = 0, time.perf_counter()
    while True:
        next(it)
        done += 1
        elapsed = time.perf_counter() - start
        if (batches is not None and done >= batches) or (batches is None and elapsed >= seconds):
            return done, elapsed


def _time_raw(files: List[Path], shard_of: np.ndarray, keys: List[bytes], readahead: bool) -> Tuple[float, int]:
    """The floor: ``txn.get`` of the same keys in the same order (bytes copied, nothing decoded)."""
    envs = [shared_env(f, readahead) for f in files]
    nbytes, t0 = 0, time.perf_counter()
    txns = [env.begin() for env in envs]
    try:
        for k, key in zip(shard_of.tolist(), keys):
            nbytes += len(txns[k].get(key))
    finally:
        for txn in txns:
            txn.abort()
    return time.perf_counter() - t0, nbytes


def _time_necessary(loader: BatchLoader, shard_of: np.ndarray, keys: List[bytes]) -> float:
    """The floor of what must be done: a numpy loop that reads the same records in the
    same order (``txn.get``), checks each (header, lengths, CRC-32 when the pipeline
    does) and copies every field the pipeline outputs channels-last into float32 batch
    buffers (no normalisation, no augmentation, no TensorFlow)."""
    B = loader.batch_size
    fields = [loader.input] + [t for t in loader.targets] + (["columns"] if "displacement" in loader.targets
                                                            and loader.has_columns else [])
    slots = [loader.slots[name] for name in fields]
    buffers = [np.empty((B,) + tuple(s.shape[1:]) + (s.shape[0],), np.float32) for s in slots]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        txns = [stack.enter_context(reading(shard.env, shard.path)) for shard in loader.shards]
        for i, (k, key) in enumerate(zip(shard_of.tolist(), keys)):
            shard = loader.shards[k]
            raw = txns[k].get(key)
            shard.layout.check(raw, loader.verify, shard.path.name)
            for slot, out in zip(slots, buffers):
                field = np.frombuffer(raw, slot.dtype, slot.count, RECORD_HEADER.size + slot.offset)
                out[i % B] = np.moveaxis(field.reshape(slot.shape), 0, -1)
    return time.perf_counter() - t0


def _checksum_rates(loader: BatchLoader, shard_of: np.ndarray, keys: List[bytes]) -> dict:
    """GB/s of the record CRC-32 (the backend in use, and zlib's) over the payloads of up
    to 64 of the same records, best of three."""
    with contextlib.ExitStack() as stack:
        txns = [stack.enter_context(reading(shard.env, shard.path)) for shard in loader.shards]
        payloads = [bytes(txns[k].get(key))[RECORD_HEADER.size:] for k, key in zip(shard_of.tolist()[:64], keys)]
    nbytes = sum(len(p) for p in payloads)

    def rate(fn):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for payload in payloads:
                fn(payload)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    return {"checksum_backend": CRC32_BACKEND, "checksum_gb_per_s": rate(crc32),
            "checksum_zlib_gb_per_s": rate(zlib.crc32)}


def _write_h5(h5: Path, loader: BatchLoader, unique: np.ndarray, names: List[str]) -> None:
    import h5py

    with h5py.File(h5, "w") as f:
        datasets = {}
        for row, local in enumerate(unique.tolist()):
            shard = loader.shards[int(loader.rec_shard[local])]
            key = sample_key(loader.rec_index[local])
            with reading(shard.env, shard.path) as txn:
                sample = shard.decode(txn.get(key), False, key)
            for name in names:
                if name not in datasets:
                    shape = sample[name].shape
                    datasets[name] = f.create_dataset(name, (len(unique),) + shape, sample[name].dtype,
                                                      chunks=(1,) + shape)
                datasets[name][row] = sample[name]


def _time_h5(h5: Path, rows: List[int], names: List[str]) -> float:
    import h5py

    t0 = time.perf_counter()
    with h5py.File(h5, "r") as f:
        handles = [f[name] for name in names]
        for row in rows:
            for handle in handles:
                handle[row]
    return time.perf_counter() - t0


def _time_ceiling(loader: BatchLoader, warm: int, batches: int) -> float:
    """Seconds for ``batches`` batches of the same tf.data skeleton whose numpy function
    only allocates the packed batch (no reading, no work): the per-batch cost of the
    framework itself, which caps any ``numpy_function`` pipeline at this batch size."""
    import tensorflow as tf

    B = loader.batch_size

    def empty(_):
        return aligned((B, loader.packed_size), np.float32)

    ds = tf.data.Dataset.range(1 << 62).map(
        lambda i: tf.reshape(tf.numpy_function(empty, [i], tf.float32, stateful=True), (B, -1)),
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return _time_pipeline(ds, warm, batches, None)[1]


def bench_data(path, *, batch_size: int, batches: Optional[int] = None, seconds: Optional[float] = None,
               split: str = "train", train_step_rate: Optional[float] = None, cold: bool = False,
               tmpdir=None, **kwargs) -> dict:
    """Samples/s of the pipeline against a raw LMDB read and h5py, on the same samples.

    The pipeline (``make_dataset`` rank 0 of 1, shuffled, repeating; ``kwargs`` are
    passed on, e.g. ``augment``, ``verify_crc``) runs for ``batches`` batches (or
    ``seconds``) after two warm-up batches. The same records, in the same order, are
    then read (1) with a bare ``txn.get`` loop (the floor: bytes copied, nothing
    decoded) and (2) from an HDF5 file holding the same samples (one dataset per field,
    one chunk per sample; written to a temporary folder first), sample by sample.
    ``ceiling_samples_per_s`` is the same tf.data skeleton doing no work at all
    (:func:`_time_ceiling`). ``ratio_vs_necessary_work`` is the pipeline against
    :func:`_time_necessary` (read, check, copy channels-last in a numpy loop: the floor
    of the work; the target is >= 0.5 on records of 100 KB or more);
    ``ratio_vs_raw_lmdb`` compares with a bare memory copy (not a target).
    ``checksum_gb_per_s`` is the record CRC-32's rate (``checksum_backend``: isal, or
    zlib without it) beside ``checksum_zlib_gb_per_s``.

    By default every reader works from the page cache (the files are read once
    first): the strictest comparison, where the raw read is a memory copy. With
    ``cold=True`` the three readers are also timed with their files dropped from the
    page cache before each (``posix_fadvise``), as when the training set is larger than
    memory, over the first epoch only (later epochs would be cached again), and
    reported under ``"cold"``.

    Returns
    -------
    dict
        ``pipeline_samples_per_s``, ``raw_lmdb_samples_per_s``, ``h5py_samples_per_s``,
        ``ratio_vs_raw_lmdb``, ``ratio_vs_h5py``, ``ceiling_samples_per_s``,
        ``necessary_work_samples_per_s``, ``ratio_vs_necessary_work``, ``checksum_gb_per_s``,
        ``checksum_zlib_gb_per_s``, ``checksum_backend``, ``samples``,
        ``batch_size``, ``bytes_per_sample``, ``settings``; ``cold`` (the same rates and
        ratios) if asked; and, if ``train_step_rate`` (samples/s of a training step) is
        given, ``train_step_samples_per_s`` and ``ratio_vs_train_step`` (pipeline ÷
        training: above 1 the input pipeline keeps up).
    """
    if batches is None and seconds is None:
        batches = 20
    root = Path(path)
    manifest = read_manifest(root)
    settings = dict(shuffle=True, seed=0, repeat=True, **kwargs)
    ds = make_dataset(root, split, batch_size=batch_size, **settings)
    loader, plan = dataset_loader(ds), ds.stemnet_plan
    files = [s.path for s in loader.shards]
    warm = 2
    done, pipeline_s = _time_pipeline(ds, warm, batches, seconds)
    del ds
    B = plan.batch_size

    def same_records(n_batches):
        """Record ids, shard numbers and keys of batches ``warm .. warm + n_batches``."""
        epochs = -(-(warm + n_batches) // plan.batches_per_epoch)
        order = np.concatenate([epoch_order(plan, e, shuffle=True, seed=0)[0] for e in range(epochs)])
        order = order[warm * B:(warm + n_batches) * B]
        return order, loader.rec_shard[order], [sample_key(i) for i in loader.rec_index[order].tolist()]

    order, shard_of, keys = same_records(done)
    samples = len(keys)
    ahead = loader.readahead
    _time_raw(files, shard_of, keys, ahead)  # page cache warm for everyone
    raw_s, nbytes = min(_time_raw(files, shard_of, keys, ahead), _time_raw(files, shard_of, keys, ahead))
    necessary_s = min(_time_necessary(loader, shard_of, keys) for _ in range(2))
    names = list(header_fields(manifest)) + ["params"]
    unique = np.unique(order)

    def rates(n, pipe_s, raw_s_, h5_s):
        out = {"pipeline_samples_per_s": n / pipe_s, "raw_lmdb_samples_per_s": n / raw_s_,
               "h5py_samples_per_s": n / h5_s}
        out["ratio_vs_raw_lmdb"] = out["pipeline_samples_per_s"] / out["raw_lmdb_samples_per_s"]
        out["ratio_vs_h5py"] = out["pipeline_samples_per_s"] / out["h5py_samples_per_s"]
        return out

    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        h5 = Path(tmp) / "same_samples.h5"
        all_ids = np.arange(len(loader.rec_index)) if cold else unique
        _write_h5(h5, loader, all_ids, names)
        h5_row = {u: r for r, u in enumerate(all_ids.tolist())}
        rows = [h5_row[u] for u in order.tolist()]
        _time_h5(h5, rows, names)
        h5_s = min(_time_h5(h5, rows, names), _time_h5(h5, rows, names))
        ceiling_s = _time_ceiling(loader, warm, done)
        result = {"samples": samples, "batch_size": B, "bytes_per_sample": nbytes / max(samples, 1),
                  "settings": {**{k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str))},
                               "readahead": ahead},
                  **rates(samples, pipeline_s, raw_s, h5_s),
                  "ceiling_samples_per_s": samples / ceiling_s,
                  "necessary_work_samples_per_s": samples / necessary_s,
                  "ratio_vs_necessary_work": necessary_s / pipeline_s,
                  **_checksum_rates(loader, shard_of, keys)}
        if cold:
            n_cold = max(1, min(done, plan.batches_per_epoch - warm))
            order_c, shard_c, keys_c = same_records(n_cold)
            rows_c = [h5_row[u] for u in order_c.tolist()]
            close_shards(root)
            _evict(files)
            ds = make_dataset(root, split, batch_size=batch_size, **settings)
            _evict(files)
            _, cold_pipe = _time_pipeline(ds, warm, n_cold, None)
            del ds
            close_shards(root)
            _evict(files)
            cold_raw, _ = _time_raw(files, shard_c, keys_c, ahead)
            _evict([h5])
            cold_h5 = _time_h5(h5, rows_c, names)
            result["cold"] = {"samples": len(keys_c), **rates(len(keys_c), cold_pipe, cold_raw, cold_h5)}
    if train_step_rate:
        result["train_step_samples_per_s"] = float(train_step_rate)
        result["ratio_vs_train_step"] = result["pipeline_samples_per_s"] / float(train_step_rate)
    return result


def synthetic_dataset(root, config=None, samples: int = 672,
                      shards: int = 2, seed: int = 0, tilt_labels: bool = False) -> Path:
    """A dataset with the field shapes of a simulation config (default: 8x8 probe grid of
    32x32 CBED patterns, 32x32 label maps: 315 KB per sample), written through the real
    shard writer but filled with seeded random numbers instead of simulations, for
    input-pipeline throughput at a realistic record size (the contents do not matter to
    it: LMDB does not compress). ``tilt_labels`` adds the ``tilt`` field (for a training
    config that predicts it). Returns ``root``.
    """
    import numpy as np

    from simulation.generator import fields as field_specs
    from simulation.config import load_simulation
    from simulation.generator import param_names
    from stemnet.shards import ShardWriter, finalize_manifest, shard_path

    cfg = load_simulation(config or shipped("simulation/bench.yaml"),
                          ["simulation.tilt_labels=true"] if tilt_labels else [])
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


def bench_data_pipeline(data_dir, config=None, batches: int = 200,
                        train_step_rate: Optional[float] = None, large: bool = True,
                        large_batches: int = 40, tmpdir=None) -> dict:
    """The input pipeline vs a raw LMDB read, an h5py file, and the training step, from
    the page cache and from disk; on ``data_dir`` and (``large``) on a synthetic dataset
    of 315 KB records (:func:`synthetic_dataset`) with as many samples as are read."""
    from stemnet.config import load_config
    from stemnet.bench.train import bench_train

    config = config or shipped("training/demo.yaml")
    cfg = load_config(config, require=("model", "train"))
    common = dict(batch_size=cfg.train.batch_size, augment=cfg.data.augment, verify_crc=cfg.data.verify_crc,
                  cold=True, tmpdir=tmpdir)
    if train_step_rate is None:
        train_step_rate = bench_train(data_dir, config, steps=20, compare=False)["ours_float32_samples_per_s"]
    result = bench_data(data_dir, batches=batches, train_step_rate=train_step_rate, **common)
    if large:
        with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
            root = synthetic_dataset(Path(tmp) / "large", samples=(large_batches + 2) * cfg.train.batch_size,
                                     tilt_labels="tilt" in cfg.data.targets)
            step = bench_train(root, config, steps=10, compare=False)["ours_float32_samples_per_s"]
            result["large"] = bench_data(root, batches=large_batches, train_step_rate=step, **common)
            close_shards(root)
    return result
