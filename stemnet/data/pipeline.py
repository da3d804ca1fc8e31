"""Shards → ``tf.data``: per-rank assignment, shuffle, decode, normalise, augment, batch.

The one place where channels-first sample arrays (as stored) become channels-last
batches (as Keras models consume them). :func:`make_dataset` yields ``(inputs, targets)``:

- ``inputs``: ``(B, H, W, C)`` float32 — CBED stacks ``(P, K, K)`` become ``(B, K, K, P)``
  (one channel per probe position, ``p = iy * gx + ix``); STEM detector images
  ``(D, H, W)`` become ``(B, H, W, D)``;
- ``targets``: a dict with ``potential`` ``(B, H, W, 1)`` (standardised with the manifest
  statistics), ``displacement`` ``(B, H, W, 9)`` (in units of
  ``Normalization.displacement_scale`` Å, channels ``A_dx, A_dy, A_dz, B_dx, …, O_dz``),
  ``displacement_mask`` ``(B, H, W, 9)`` (the ``columns`` weight of each channel's
  sublattice, repeated over dx, dy, dz), ``tilt`` ``(B, H, W, 3)`` (the per-cell
  octahedral tilt about x, y, z, in units of ``Normalization.tilt_scale`` degrees;
  unmasked: the map is defined everywhere) and ``weight`` ``(B,)`` (1 for a real sample, 0
  for padding: losses must be weighted by it); optionally ``index`` (global sample
  index, int64) and ``params`` (float32 parameter vector).

Which records a rank reads: :mod:`stemnet.data.assignment`. How a batch is made:
:mod:`stemnet.data.loader`. Shards are opened read-only once per process
(:func:`~stemnet.shards.close_shards` releases them), with OS readahead chosen by
:func:`choose_readahead`. Each record's CRC-32 is checked (``verify_crc=True``;
``"once"`` checks each record on its first read in the process only, ``False`` never).
Gaussian noise (``noise_std``, after normalisation) is added to the inputs. All random
draws come from ``(seed, epoch, rank, batch)``: the same seed gives the same batches
whatever the parallelism. Errors raised while iterating surface as
``tf.errors.OpError``; :func:`user_error` (or :func:`one_line_errors`) recovers the
one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from stemnet.data.assignment import epoch_order, plan_split
from stemnet.data.layout import TARGETS, probe_grid as dataset_probe_grid
from stemnet.data.loader import ERROR_MARK, BatchLoader
from stemnet.data.normalization import Normalization
from stemnet.errors import UserError
from stemnet.log import get_logger
from stemnet.shards import RECORD_HEADER, ShardError, header_fields, read_manifest

log = get_logger("data")

READAHEAD_MIN_RECORD = 32 * 1024


@dataclass(frozen=True)
class DatasetOptions:
    """How the samples of a split are read, transformed and batched.

    Attributes
    ----------
    targets : sequence of {'potential', 'displacement', 'tilt'}, optional
        Default: every one of them the dataset holds.
    shuffle, seed : bool, int
        Full reshuffle of the rank's records every epoch, from ``(seed, epoch, rank)``.
    augment : bool
        Random symmetries of the square (:mod:`stemnet.data.augment`).
    cbed_normalization : {'none', 'sqrt', 'log1p', 'standardize'}
        CBED input transform; STEM inputs are standardised per detector unless 'none'.
    noise_std : float
        Std of Gaussian noise added to the normalised inputs.
    verify_crc : bool or 'once'
        Check record CRCs (every read, first read only, never).
    skip_corrupt : bool
        Skip a bad record (weight 0, counted, logged) instead of raising.
    deterministic : bool
        False lets parallel batches come out in any order (contents still fixed by seed).
    probe_grid : (gx, gy), optional
        CBED probe grid when the manifest has no simulation config and P is not square.
    probe_grid_origin : {'corner', 'center'}
        Where probe 0 sits; decides how mirrors permute the probe grid.
    include_index, include_params : bool
        Add ``index`` (global sample index) / ``params`` to the targets dict.
    readahead : bool, optional
        OS readahead on the shard maps; default :func:`choose_readahead`.
    num_parallel_calls, prefetch : int, optional
        tf.data parallelism and prefetch depth (default AUTOTUNE).
    """

    targets: Optional[Tuple[str, ...]] = None
    shuffle: bool = True
    seed: int = 0
    augment: bool = False
    cbed_normalization: str = "sqrt"
    noise_std: float = 0.0
    verify_crc: Union[bool, str] = True
    skip_corrupt: bool = False
    deterministic: bool = True
    probe_grid: Optional[Tuple[int, int]] = None
    probe_grid_origin: str = "center"
    include_index: bool = False
    include_params: bool = False
    readahead: Optional[bool] = None
    num_parallel_calls: Optional[int] = None
    prefetch: Optional[int] = None

    def replace(self, **changes) -> "DatasetOptions":
        """A copy with ``changes``; an unknown name is a one-line error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UserError(f"dataset option {unknown[0]!r}: expected one of {sorted(known)}")
        return dataclasses.replace(self, **changes)


def record_bytes(manifest: dict) -> int:
    """Bytes of one stored record (header + fields + params)."""
    fields = header_fields(manifest)
    payload = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in fields.values())
    return RECORD_HEADER.size + payload + 8 * len(manifest.get("param_names", []))


def choose_readahead(manifest: dict, shuffle: bool) -> bool:
    """OS readahead for reading a dataset: on for sequential reads, and for shuffled
    reads of records of ``READAHEAD_MIN_RECORD`` bytes or more.

    Readahead off is the usual advice for random access, but a large record is a run of
    contiguous LMDB overflow pages: without readahead each 4 KiB page is a separate
    read. Measured from a cold page cache, 119 KB records in shuffled order: 350
    records/s with readahead off, 6,600 with it on.
    """
    return (not shuffle) or record_bytes(manifest) >= READAHEAD_MIN_RECORD


def make_dataset(path, split: str = "train", *, batch_size: int, rank: int = 0, world: int = 1,
                 epoch: int = 0, repeat=False, start_batch: int = 0,
                 options: Optional[DatasetOptions] = None, normalization: Optional[Normalization] = None,
                 **option_values):
    """A ``tf.data.Dataset`` of ``(inputs, targets)`` batches from a sharded dataset.

    Parameters
    ----------
    path : path-like
        Dataset folder (``manifest.json`` + shards), or a folder made by
        :func:`stemnet.stage.stage` for this rank.
    split : {'train', 'val', 'test'}
    batch_size : int
        Samples per batch on this rank (the local batch size).
    rank, world : int
        This process's rank and the number of ranks (:mod:`stemnet.data.assignment`).
    epoch : int
        The first epoch (its order and augmentation draws); for resuming.
    repeat : bool or int
        False: one epoch; True: epochs forever; n: n epochs.
    start_batch : int
        Skip this many batches of the first epoch (exact resume, cheap).
    options : DatasetOptions, optional
        How samples are read and transformed; ``option_values`` (e.g. ``augment=True``)
        are shorthand for ``options.replace(...)``.
    normalization : Normalization, optional
        Use this instead of the dataset's (e.g. the training set's, for val/test).

    Returns
    -------
    tf.data.Dataset
        Elements ``(inputs, targets)``; see the module notes for shapes. The returned
        object also carries ``stemnet_plan`` (:class:`SplitPlan`: batches per epoch,
        samples, padding) and ``stemnet_normalization`` (save it with the run);
        datasets derived from it (``.take``, ...) do not.

    Raises
    ------
    UserError
        Missing manifest, unknown split or target, empty split, more ranks than
        samples, a shard that is missing or disagrees with the manifest.
    """
    import tensorflow as tf

    opts = (options or DatasetOptions()).replace(**option_values)
    root = Path(path)
    manifest = read_manifest(root)
    fields = header_fields(manifest)
    targets = tuple(t for t in TARGETS if t in fields) if opts.targets is None else tuple(opts.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UserError(f"target {unknown[0] if unknown else None!r}: expected one or more of {list(TARGETS)}")
    for t in targets:
        if t not in fields:
            raise UserError(f"{root}: target {t!r} is not a field of this dataset ({list(fields)})")
    plan = plan_split(manifest, split, rank=rank, world=world, batch_size=batch_size, where=str(root))
    norm = normalization or Normalization.from_manifest(manifest, opts.cbed_normalization)
    grid = dataset_probe_grid(manifest, opts.probe_grid) if norm.kind == "cbed" else None
    readahead = choose_readahead(manifest, opts.shuffle) if opts.readahead is None else opts.readahead
    loader = BatchLoader(root, manifest, plan, targets=targets, norm=norm, augment=opts.augment,
                         noise_std=opts.noise_std, verify_crc=opts.verify_crc, skip_corrupt=opts.skip_corrupt,
                         seed=opts.seed, grid=grid, probe_grid_origin=opts.probe_grid_origin,
                         readahead=readahead, include_index=opts.include_index,
                         include_params=opts.include_params)
    B = plan.batch_size
    if not 0 <= int(start_batch) < plan.batches_per_epoch:
        raise UserError(f"start_batch {start_batch}: expected 0 <= start_batch < {plan.batches_per_epoch} "
                        "(batches per epoch)")
    if plan.padding:
        log.info("%s %s rank %d/%d: %d samples + %d weight-0 repeats in %d batches per epoch",
                 root, split, rank, world, plan.samples, plan.padding, plan.batches_per_epoch)
    shuffle, seed = opts.shuffle, opts.seed

    def epoch_plan(e):
        ids, weights = epoch_order(plan, int(e), shuffle=shuffle, seed=seed)
        nb = plan.batches_per_epoch
        first = int(start_batch) if int(e) == int(epoch) else 0
        batch_no = np.arange(nb, dtype=np.int64)
        return (ids.reshape(nb, B)[first:], weights.reshape(nb, B)[first:],
                np.full(nb - first, e, np.int64), batch_no[first:])

    def per_epoch(e):
        ids, weights, es, bn = tf.numpy_function(epoch_plan, [e], (tf.int64, tf.float32, tf.int64, tf.int64),
                                                 stateful=False)
        ids.set_shape((None, B))
        weights.set_shape((None, B))
        es.set_shape((None,))
        bn.set_shape((None,))
        return tf.data.Dataset.from_tensor_slices((ids, weights, es, bn))

    if repeat is True:
        epochs = tf.data.Dataset.counter(start=int(epoch))
    else:
        n = 1 if repeat is False or repeat is None else int(repeat)
        epochs = tf.data.Dataset.range(int(epoch), int(epoch) + n)
    tout = [tf.float32] + [tf.int64] * len(loader.extras)

    def load(ids, weights, e, bn):
        return loader.finish(tf.numpy_function(loader, [ids, weights, e, bn], tout, stateful=True))

    parallel = tf.data.AUTOTUNE if opts.num_parallel_calls is None else int(opts.num_parallel_calls)
    ds = epochs.flat_map(per_epoch)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=bool(opts.deterministic))
    ds = ds.prefetch(tf.data.AUTOTUNE if opts.prefetch is None else int(opts.prefetch))
    tf_options = tf.data.Options()
    tf_options.deterministic = bool(opts.deterministic)
    ds = ds.with_options(tf_options)
    ds.stemnet_plan = plan
    ds.stemnet_normalization = norm
    ds.stemnet_loader = loader
    return ds


def dataset_loader(dataset) -> Optional[BatchLoader]:
    """The :class:`~stemnet.data.loader.BatchLoader` behind a dataset from
    :func:`make_dataset` (None for a derived dataset)."""
    return getattr(dataset, "stemnet_loader", None)


def corrupt_count(dataset) -> int:
    """Corrupt records skipped so far by a dataset made with ``skip_corrupt=True``
    (the dataset object returned by :func:`make_dataset`, not a derived one)."""
    loader = dataset_loader(dataset)
    return 0 if loader is None else loader.corrupt


def user_error(error: BaseException) -> Optional[UserError]:
    """The one-line :class:`UserError` inside a ``tf.errors.OpError`` raised while
    iterating a dataset from :func:`make_dataset`, or None if it holds none."""
    if isinstance(error, UserError):
        return error
    text = getattr(error, "message", None) or str(error)
    for line in text.splitlines():
        at = line.find(ERROR_MARK)
        if at >= 0:
            return ShardError(line[at + len(ERROR_MARK):])
    return None


@contextlib.contextmanager
def one_line_errors():
    """Re-raise data errors hidden in TensorFlow errors as one-line ``UserError``."""
    try:
        yield
    except Exception as error:  # tf.errors.OpError without importing tf here
        found = user_error(error)
        if found is None or found is error:
            raise
        raise found from None
