"""Shards → ``tf.data``: per-rank assignment, shuffle, decode, normalise, augment, batch.

This module is the one place where channels-first sample arrays (as stored) become
channels-last batches (as Keras models consume them).

Pipeline
--------
``make_dataset`` yields ``(inputs, targets)`` batches:

- ``inputs``: ``(B, H, W, C)`` float32 — CBED stacks ``(P, K, K)`` become ``(B, K, K, P)``
  (one channel per probe position, ``p = iy * gx + ix``); STEM detector images
  ``(D, H, W)`` become ``(B, H, W, D)``;
- ``targets``: a dict with ``potential`` ``(B, H, W, 1)`` (standardised with the manifest
  statistics), ``displacement`` ``(B, H, W, 9)`` (in units of
  ``Normalization.displacement_scale`` Å, channels ``A_dx, A_dy, A_dz, B_dx, …, O_dz``),
  ``displacement_mask`` ``(B, H, W, 9)`` (the ``columns`` weight of each channel's
  sublattice, repeated over dx, dy, dz) and ``weight`` ``(B,)`` (1 for a real sample, 0
  for padding); optionally ``index`` (global sample index, int64) and ``params``
  (float32 parameter vector).

Rank assignment and padding
---------------------------
Non-empty shards of a split go round-robin to ranks (rank ``r`` reads shards ``r``,
``r + W``, …). With fewer shards than ranks, shard ``s`` is shared by ranks ``s``,
``s + S``, … which take its records (in key order) with a stride. Every sample of the
split is read by exactly one rank once per epoch. Ranks may hold different numbers of
samples, but all ranks must run the same number of steps (a rank that stops early
hangs the others in an allreduce), so every rank yields
``ceil(max_rank_samples / batch_size)`` full batches per epoch: the slots left over are
filled with repeats of the rank's own samples carrying ``weight = 0``. Losses must be
weighted by ``weight`` (a weight-0 sample still passes through batch normalisation).
The assignment is a pure function of the manifest, so :func:`stemnet.stage.stage` copies
exactly the shards a rank will read.

Reading
-------
Shards are opened read-only (``lock=False``), once per process (py-lmdb refuses a
second handle; :func:`close_shards` releases them), with OS readahead chosen by
:func:`choose_readahead` (on for records of 32 KiB or more even when shuffling: a large
record is a run of contiguous pages). A batch is one ``tf.numpy_function`` call: one
LMDB transaction per shard, each record checked (the layout of
:func:`stemnet.shards.decode_record`, precomputed per shard) and copied into a staging
buffer; then each output field is made in one compiled pass (:mod:`stemnet.gather`:
channels-first → channels-last, the symmetry, normalisation, vector signs, the mask and
a NaN/Inf check) that releases the GIL, straight into one packed float32 batch (one
hand-over to TensorFlow, which slices it into the named tensors); batches run in
parallel and are prefetched. Each record's CRC-32 is checked (``verify_crc=True``;
``"once"`` checks each record on its first read in the process only, ``False`` never);
a failing record raises a one-line :class:`~stemnet.shards.ShardError` naming shard and
key, or with ``skip_corrupt`` is replaced by a weight-0 sample, counted
(:func:`corrupt_count`) and logged. NaN or Inf in a record raises (or is skipped) the
same way.

Errors raised while iterating surface as ``tf.errors.OpError``; :func:`user_error`
(or the :func:`one_line_errors` context manager) recovers the one-line message.

Augmentation
------------
The eight symmetries of the square (flips and 90° rotations), drawn per sample, are
applied to every real-space map. Arrays are indexed ``[y, x]`` (rows follow y). Each
symmetry is written as an optional transpose (swap x and y) followed by optional flips
of y and x; displacement vectors transform with it: transpose swaps (dx, dy), a flip of
y negates dy, a flip of x negates dx, dz never changes. A rotation
``np.rot90`` (transpose, then flip y) thus maps (dx, dy) → (dy, −dx). Masks and the
potential transform as scalars. For CBED, the same transform permutes the probe grid
(channels, ``[iy, ix]``) *and* is applied to each diffraction pattern (``[ky, kx]``): a
real-space rotation or mirror rotates or mirrors reciprocal space identically. Maps and
patterns are taken as sampled at pixel centres (``(i + ½)·d``, as the label maps are);
the probe grid's origin is ``probe_grid_origin``: ``"center"`` (probe ``i`` at
``(i + ½)·d``, as :func:`simulation.multislice.probe_positions` scans; the default) makes
a mirror map probe ``i`` to ``n − 1 − i``; ``"corner"`` (probe ``i`` at ``i·d``) to
``(n − i) mod n`` (exact for a periodic field of view).
Transposes need square grids; otherwise only flips are drawn. Gaussian noise
(``noise_std``, after normalisation) is added to the inputs. All random draws come from
``(seed, epoch, rank, batch)``: the same seed gives the same batches whatever the
parallelism.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import lmdb
import numpy as np

from stemnet import shards as _shards
from stemnet.errors import UserError
from stemnet.gather import gather, index_table
from stemnet.log import get_logger
from stemnet.shards import (
    FORMAT_VERSION,
    MAGIC,
    RECORD_HEADER,
    ShardError,
    check_header,
    decode_record,
    header_fields,
    read_manifest,
)

log = get_logger("data")

TARGETS = ("potential", "displacement")
TARGET_FIELDS = ("potential", "displacement", "columns")
CBED_NORMALIZATIONS = ("none", "sqrt", "log1p", "standardize")
STEM_NORMALIZATIONS = ("none", "standardize")
SUBLATTICES = ("A", "B", "O")
DISPLACEMENT_CHANNELS = tuple(f"{s}_{c}" for s in SUBLATTICES for c in ("dx", "dy", "dz"))
DX = np.array([0, 3, 6])
DY = np.array([1, 4, 7])
SWAP_XY = np.array([1, 0, 2, 4, 3, 5, 7, 6, 8])  # displacement channels under a transpose
EPS = 1e-6
_ERROR_MARK = "stemnet-data-error: "


# =============================================================================== layout
def input_field(manifest: dict) -> str:
    """The measurement field of a dataset: ``cbed`` or ``stem`` (or whatever is not a label).

    ``manifest["extra"]["simulation"]["mode"]`` wins when present; otherwise the single
    field that is not ``potential``/``displacement``/``columns``.
    """
    names = [f["name"] for f in manifest["fields"]]
    mode = (manifest.get("extra") or {}).get("simulation", {}).get("mode")
    if mode in names:
        return mode
    rest = [n for n in names if n not in TARGET_FIELDS]
    if len(rest) != 1:
        raise UserError(
            f"manifest fields {names}: expected exactly one input field besides "
            f"{list(TARGET_FIELDS)}, found {rest}"
        )
    return rest[0]


def probe_grid(manifest: dict, grid: Optional[Sequence[int]] = None) -> Optional[Tuple[int, int]]:
    """``(gx, gy)`` of a CBED dataset: ``grid`` if given, else the simulation config, else
    the square root of the number of patterns (None if that is not a square)."""
    name = input_field(manifest)
    shape = header_fields(manifest)[name].shape
    patterns = int(shape[0])
    if grid is None:
        sim = (manifest.get("extra") or {}).get("simulation") or {}
        grid = (sim.get("cbed") or {}).get("grid") if sim.get("mode", name) == "cbed" else None
    if grid is None:
        root = math.isqrt(patterns)
        return (root, root) if root * root == patterns else None
    gx, gy = (int(g) for g in grid)
    if gx * gy != patterns:
        raise UserError(
            f"probe grid {gx}x{gy}: {gx * gy} positions, but field {name!r} holds {patterns} patterns"
        )
    return gx, gy


_probe_grid = probe_grid  # make_dataset's argument of the same name hides it


# ========================================================================== normalisation
@dataclass
class Normalization:
    """How raw sample arrays become network inputs and targets, and back.

    Built from the manifest statistics (:meth:`from_manifest`), saved with a run
    (:meth:`to_dict` / :meth:`from_dict`) and applied to experimental data later.

    - CBED (``kind="cbed"``): ``none`` (raw), ``sqrt`` (``sqrt(max(x, 0) / scale)``),
      ``log1p`` (``log1p(max(x, 0) / scale)``), with ``scale`` the dataset's mean
      intensity so values are O(1); ``standardize``: each pattern to zero mean and unit
      standard deviation over its own K×K pixels (per sample, no dataset statistics).
    - STEM (``kind="stem"``): ``standardize`` each detector channel with the dataset's
      per-channel mean and std; or ``none``.
    - potential: ``(v - mean) / std`` with the dataset's statistics.
    - displacement: divided by ``displacement_scale`` (Å), the root-mean-square
      displacement at column sites estimated from the statistics (``sqrt(E[d²] /
      E[columns])``), so the network regresses O(1) numbers; :meth:`denormalize` gives Å.
    """

    kind: str
    method: str
    scale: float = 1.0
    channel_mean: Tuple[float, ...] = ()
    channel_std: Tuple[float, ...] = ()
    potential_mean: float = 0.0
    potential_std: float = 1.0
    displacement_scale: float = 1.0

    def __post_init__(self):
        allowed = CBED_NORMALIZATIONS if self.kind == "cbed" else STEM_NORMALIZATIONS
        if self.method not in allowed:
            raise UserError(
                f"normalization {self.method!r} for {self.kind} inputs: expected one of {list(allowed)}"
            )

    @classmethod
    def from_manifest(cls, manifest: dict, cbed_normalization: str = "sqrt") -> "Normalization":
        """Normalisation for a dataset; for STEM inputs ``standardize`` is used unless
        ``cbed_normalization`` is ``"none"``."""
        name = input_field(manifest)
        stats = manifest.get("stats") or {}
        if name not in stats:
            raise UserError(f"manifest has no statistics for field {name!r}; rerun finalize")
        kind = "cbed" if _looks_cbed(manifest, name) else "stem"
        pot = stats.get("potential") or {"mean": 0.0, "std": 1.0}
        common = dict(potential_mean=float(pot["mean"] or 0.0),
                      potential_std=_safe_std(pot.get("std")),
                      displacement_scale=_displacement_scale(stats))
        if kind == "cbed":
            if cbed_normalization not in CBED_NORMALIZATIONS:
                raise UserError(
                    f"cbed_normalization {cbed_normalization!r}: expected one of {list(CBED_NORMALIZATIONS)}"
                )
            mean = float(stats[name].get("mean") or 0.0)
            return cls("cbed", cbed_normalization, scale=mean if mean > 0 else 1.0, **common)
        channels = stats[name]["channels"]
        method = "none" if cbed_normalization == "none" else "standardize"
        return cls("stem", method, channel_mean=tuple(float(m) for m in channels["mean"]),
                   channel_std=tuple(_safe_std(s) for s in channels["std"]), **common)

    def to_dict(self) -> dict:
        """JSON-ready description (inverse: :meth:`from_dict`)."""
        return {"kind": self.kind, "method": self.method, "scale": self.scale,
                "channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
                "potential_mean": self.potential_mean, "potential_std": self.potential_std,
                "displacement_scale": self.displacement_scale}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalization":
        data = dict(data)
        data["channel_mean"] = tuple(data.get("channel_mean", ()))
        data["channel_std"] = tuple(data.get("channel_std", ()))
        return cls(**data)

    # -- forward
    def inputs(self, x: np.ndarray, *, channels_last: bool = True, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalised float32 inputs of shape ``(..., H, W, C)`` (or ``(..., C, H, W)``).

        ``out=x`` normalises in place (``x`` must then be float32).
        """
        x = np.asarray(x)
        if out is None:
            out = np.array(x, dtype=np.float32, copy=True)
        elif out is not x:
            out[...] = x
        if self.method == "none":
            return out
        if self.kind == "cbed":
            if self.method == "standardize":
                axes = (-3, -2) if channels_last else (-2, -1)
                mean = out.mean(axis=axes, keepdims=True)
                out -= mean
                std = np.sqrt(np.mean(np.square(out), axis=axes, keepdims=True))
                std += EPS
                out /= std
                return out
            np.maximum(out, 0, out=out)
            out *= np.float32(1.0 / self.scale)
            (np.sqrt if self.method == "sqrt" else np.log1p)(out, out=out)
            return out
        shape = (-1,) if channels_last else (-1, 1, 1)
        mean = np.asarray(self.channel_mean, np.float32).reshape(shape)
        inv = (1.0 / np.asarray(self.channel_std, np.float32)).reshape(shape)
        out -= mean
        out *= inv
        return out

    def potential(self, v: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Standardised potential (any layout)."""
        v = np.asarray(v)
        if out is None:
            out = np.array(v, dtype=np.float32, copy=True)
        elif out is not v:
            out[...] = v
        out -= np.float32(self.potential_mean)
        out *= np.float32(1.0 / self.potential_std)
        return out

    # -- inverse
    def denormalize(self, predictions) -> dict:
        """Predictions in physical units: potential in V·Å, displacement in Å.

        ``predictions``: a dict with ``potential`` and/or ``displacement`` (numpy or
        tensors), or a bare potential array.
        """
        if not isinstance(predictions, dict):
            predictions = {"potential": predictions}
        out = {}
        for key, value in predictions.items():
            value = np.asarray(value, dtype=np.float32)
            if key == "potential":
                value = value * np.float32(self.potential_std) + np.float32(self.potential_mean)
            elif key == "displacement":
                value = value * np.float32(self.displacement_scale)
            out[key] = value
        return out

    def denormalize_inputs(self, x: np.ndarray, *, channels_last: bool = True) -> np.ndarray:
        """Inverse of :meth:`inputs` where one exists (not for per-pattern standardisation)."""
        x = np.asarray(x, dtype=np.float32)
        if self.method == "none":
            return x.copy()
        if self.kind == "cbed":
            if self.method == "sqrt":
                return np.square(x) * np.float32(self.scale)
            if self.method == "log1p":
                return np.expm1(x) * np.float32(self.scale)
            raise UserError("per-pattern standardisation has no inverse (pattern means are not kept)")
        shape = (-1,) if channels_last else (-1, 1, 1)
        return x * np.asarray(self.channel_std, np.float32).reshape(shape) + np.asarray(
            self.channel_mean, np.float32).reshape(shape)


def _looks_cbed(manifest: dict, name: str) -> bool:
    """Whether the input field is a CBED stack: by name (``cbed``/``stem``), else by the
    simulation mode, else by shape (patterns are not on the label grid)."""
    if name in ("cbed", "stem"):
        return name == "cbed"
    sim = (manifest.get("extra") or {}).get("simulation") or {}
    if sim.get("mode"):
        return sim["mode"] == "cbed"
    fields = header_fields(manifest)
    labels = [fields[n].shape[1:] for n in TARGET_FIELDS if n in fields]
    return bool(labels) and tuple(fields[name].shape[1:]) != tuple(labels[0])


def _displacement_scale(stats: dict) -> float:
    """RMS displacement at column sites (Å): sqrt(E[d²] / E[mask]) over the label maps."""
    d, c = stats.get("displacement"), stats.get("columns")
    if not d or not c or not c.get("mean"):
        return 1.0
    second = float(d.get("std") or 0.0) ** 2 + float(d.get("mean") or 0.0) ** 2
    scale = math.sqrt(second / float(c["mean"]))
    return scale if scale > 1e-4 else 1.0


def _safe_std(value) -> float:
    value = float(value or 0.0)
    return value if value > EPS else 1.0


def load_normalization(path, cbed_normalization: str = "sqrt") -> Normalization:
    """:meth:`Normalization.from_manifest` of the dataset at ``path``."""
    return Normalization.from_manifest(read_manifest(path), cbed_normalization)


# ============================================================================ assignment
@dataclass(frozen=True)
class ShardSlice:
    """Part of one shard read by one rank: records ``offset::stride`` in key order."""

    path: str  # relative to the dataset folder, e.g. "train/shard-00000.lmdb"
    offset: int
    stride: int
    count: int  # records this rank reads from the shard
    total: int  # records in the shard (manifest)


def _split_shards(manifest: dict, split: str, where: str) -> List[dict]:
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise UserError(f"{where}: no split {split!r} in the manifest; expected one of {sorted(splits)}")
    shards = [s for s in splits[split]["shards"] if int(s["count"]) > 0]
    if not shards:
        raise UserError(f"{where}: split {split!r} has no samples")
    return shards


def assign_shards(manifest: dict, split: str, rank: int, world: int, where: str = "dataset") -> List[List[ShardSlice]]:
    """The shard slices of every rank (a list of ``world`` lists), from the manifest alone.

    Non-empty shards go round-robin to ranks; with fewer shards than ranks, records of a
    shard are strided over the ranks that share it. ``rank`` is only validated.

    Raises
    ------
    UserError
        Unknown or empty split, bad rank/world, more ranks than samples, or a rank
        that would get no sample at all.
    """
    world, rank = int(world), int(rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} of world {world}: expected 0 <= rank < world")
    shards = _split_shards(manifest, split, where)
    total = sum(int(s["count"]) for s in shards)
    if world > total:
        raise UserError(
            f"{where}: split {split!r} has {total} samples but {world} ranks; "
            f"expected at most {total} ranks"
        )
    per_rank: List[List[ShardSlice]] = [[] for _ in range(world)]
    n_shards = len(shards)
    if n_shards >= world:
        for k, s in enumerate(shards):
            n = int(s["count"])
            per_rank[k % world].append(ShardSlice(s["path"], 0, 1, n, n))
    else:
        for r in range(world):
            k = r % n_shards
            sharing = len(range(k, world, n_shards))
            j = r // n_shards
            n = int(shards[k]["count"])
            per_rank[r].append(ShardSlice(shards[k]["path"], j, sharing, len(range(j, n, sharing)), n))
    for r, slices in enumerate(per_rank):
        if sum(s.count for s in slices) == 0:
            counts = [int(s["count"]) for s in shards]
            raise UserError(
                f"{where}: split {split!r}: rank {r} of {world} would get no samples "
                f"(shard counts {counts}); use fewer ranks or more evenly filled shards"
            )
    return per_rank


@dataclass(frozen=True)
class SplitPlan:
    """What one rank reads from one split, per epoch."""

    split: str
    rank: int
    world: int
    batch_size: int
    shards: Tuple[ShardSlice, ...]  # this rank's
    rank_samples: Tuple[int, ...]  # every rank's real samples per epoch
    batches_per_epoch: int

    @property
    def samples(self) -> int:
        """Real (weight-1) samples this rank yields per epoch."""
        return self.rank_samples[self.rank]

    @property
    def padding(self) -> int:
        """Weight-0 repeats this rank adds per epoch."""
        return self.batches_per_epoch * self.batch_size - self.samples


def plan_split(manifest: dict, split: str, *, rank: int = 0, world: int = 1,
               batch_size: int, where: str = "dataset") -> SplitPlan:
    """Rank ``rank``'s shards and the common number of batches per epoch."""
    if int(batch_size) < 1:
        raise UserError(f"batch_size {batch_size}: expected a positive integer")
    per_rank = assign_shards(manifest, split, rank, world, where)
    counts = tuple(sum(s.count for s in slices) for slices in per_rank)
    batches = -(-max(counts) // int(batch_size))
    return SplitPlan(split, int(rank), int(world), int(batch_size), tuple(per_rank[rank]), counts, batches)


def epoch_order(plan: SplitPlan, epoch: int, *, shuffle: bool = True, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Local record positions (into the rank's records) and weights for one epoch.

    Returns arrays of length ``batches_per_epoch * batch_size``: the rank's records once
    each with weight 1, padded with repeats carrying weight 0 (randomly placed when
    shuffling, at the end otherwise).
    """
    n = plan.samples
    slots = plan.batches_per_epoch * plan.batch_size
    rng = np.random.default_rng([int(seed), int(epoch), int(plan.rank), 0x5EED])
    order = rng.permutation(n) if shuffle else np.arange(n)
    pad = slots - n
    ids = np.concatenate([order, order[np.arange(pad) % n]]).astype(np.int64)
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if shuffle and pad:
        mix = rng.permutation(slots)
        ids, weights = ids[mix], weights[mix]
    return ids, weights


# ============================================================================ shard cache
_ENVS: Dict[Tuple[int, str], lmdb.Environment] = {}
_ENV_LOCK = threading.Lock()
_ENV_IDLE = threading.Condition(_ENV_LOCK)  # signalled when a read transaction ends
_ENV_BUSY: Dict[int, int] = {}  # id(env) -> read transactions in flight


@contextlib.contextmanager
def _reading(env: lmdb.Environment):
    """A read transaction that :func:`close_shards` waits for: closing an environment
    under a transaction still decoding from its zero-copy buffers would crash the process
    (a prefetching dataset's threads can outlive the loop that iterated it)."""
    with _ENV_IDLE:
        _ENV_BUSY[id(env)] = _ENV_BUSY.get(id(env), 0) + 1
    try:
        with env.begin(buffers=True) as txn:
            yield txn
    finally:
        with _ENV_IDLE:
            _ENV_BUSY[id(env)] -= 1
            _ENV_IDLE.notify_all()


def _shard_env(path: Path, readahead: bool = False) -> lmdb.Environment:
    """The process's one read-only environment on ``path`` (opened on first use)."""
    key = (os.getpid(), str(Path(path).resolve()))
    with _ENV_LOCK:
        env = _ENVS.get(key)
        if env is None:
            if not Path(path).is_file():
                raise ShardError(f"{path}: no such shard file")
            try:
                env = lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                                readahead=readahead, max_spare_txns=4)
            except lmdb.Error as error:
                raise ShardError(f"{path}: cannot open as an LMDB shard: {error}") from None
            _ENVS[key] = env
        return env


READAHEAD_MIN_RECORD = 32 * 1024


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


def close_shards(under=None) -> int:
    """Close this process's cached shard environments (all, or those under a folder).

    Needed before another LMDB handle opens the same file in this process (py-lmdb
    refuses a second one), e.g. :func:`stemnet.shards.verify_dataset`. Datasets built
    earlier must not be iterated afterwards. Returns how many were closed.
    """
    root = None if under is None else str(Path(under).resolve())
    closed = 0
    with _ENV_IDLE:
        for key in list(_ENVS):
            if key[0] != os.getpid() and root is None:
                _ENVS.pop(key)  # inherited through fork: never use, never close
                continue
            if root is None or key[1] == root or key[1].startswith(root + os.sep):
                env = _ENVS.pop(key)
                _ENV_IDLE.wait_for(lambda: _ENV_BUSY.get(id(env), 0) == 0, timeout=60)
                _ENV_BUSY.pop(id(env), None)
                env.close()
                closed += 1
    return closed


def _read_shard_header(env: lmdb.Environment, path: Path) -> dict:
    header = _shards._read_header(env, path)
    if header is None:
        raise ShardError(f"{path}: no {_shards.HEADER_KEY.decode()} entry; expected a stemnet shard")
    return header


class _Shard:
    """One open shard: header, precomputed record layout, this rank's keys."""

    def __init__(self, root: Path, piece: ShardSlice, manifest: dict, readahead: bool):
        self.path = root / piece.path
        if not self.path.is_file():
            staged = manifest.get("staged")
            hint = ""
            if staged:
                hint = (f" (this folder was staged for rank {staged.get('rank')} of "
                        f"{staged.get('world')}; stage it for this rank)")
            raise ShardError(f"{self.path}: no such shard file; the manifest lists it{hint}")
        self.env = _shard_env(self.path, readahead)
        self.header = _read_shard_header(self.env, self.path)
        faults = check_header(self.header, manifest, self.path)
        if faults:
            raise ShardError(faults[0])
        with self.env.begin() as txn:
            keys = [int(k) for k in _shards._record_keys(txn)]
        if len(keys) != piece.total:
            raise ShardError(
                f"{self.path}: holds {len(keys)} records; the manifest and header say {piece.total}"
            )
        self.indices = np.asarray(keys[piece.offset::piece.stride], np.int64)
        slots, self.payload = _shards._layout(self.header)
        self.slots = {s.name: s for s in slots}

    def check(self, raw, verify: bool, key: bytes) -> None:
        """Raise the canonical one-line :class:`ShardError` (shard and key) unless ``raw``
        is a well-formed record of this shard's layout (and, if ``verify``, its CRC holds)."""
        size = len(raw)
        ok = size == RECORD_HEADER.size + self.payload
        if ok:
            magic, version, _flags, length, crc = RECORD_HEADER.unpack_from(raw)
            ok = magic == MAGIC and version == FORMAT_VERSION and length == self.payload
            if ok and verify:
                ok = zlib.crc32(raw[RECORD_HEADER.size:]) == crc
        if not ok:
            where = f"{self.path}:{key.decode()}"
            decode_record(self.header, raw, verify, where)  # raises with the reason
            raise ShardError(f"{where}: record does not match the shard layout")

    def decode(self, raw, verify: bool, key: bytes) -> Dict[str, np.ndarray]:
        """Fast path of :func:`shards.decode_record` (layout precomputed)."""
        self.check(raw, verify, key)
        base = RECORD_HEADER.size
        return {name: np.frombuffer(raw, s.dtype, s.count, base + s.offset).reshape(s.shape)
                for name, s in self.slots.items()}


def _aligned(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data is ``align``-byte aligned: TensorFlow then
    wraps a ``numpy_function`` result without copying it."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


# ============================================================================ augmentation
def _flip(a: np.ndarray, axis: int, origin: float) -> np.ndarray:
    """Mirror a grid sampled at ``(i + origin)·d`` about the centre of its field of view."""
    flipped = np.flip(a, axis)
    return flipped if origin else np.roll(flipped, 1, axis)


def d4_array(a: np.ndarray, element: Sequence[int], axes: Tuple[int, int] = (-2, -1),
             origin: float = 0.5) -> np.ndarray:
    """Apply a symmetry of the square to the (y, x) axes of ``a`` (a view when possible).

    ``element = (transpose, flip_y, flip_x)``: swap y and x, then mirror y, then mirror
    x. ``origin`` is the sampling offset of the grid in pixels (0.5 = pixel centres,
    0 = the first sample on the field-of-view edge).
    """
    t, fy, fx = (bool(e) for e in element)
    ay, ax = axes
    if t:
        a = np.swapaxes(a, ay, ax)
    if fy:
        a = _flip(a, ay, origin)
    if fx:
        a = _flip(a, ax, origin)
    return a


def d4_vectors(d: np.ndarray, element: Sequence[int], channel_axis: int = -1) -> np.ndarray:
    """Transform the 9 displacement channels (A, B, O × dx, dy, dz) as vectors.

    Only the components: combine with :func:`d4_array` for the positions.
    """
    t, fy, fx = (bool(e) for e in element)
    d = np.moveaxis(np.asarray(d), channel_axis, -1)
    if t:
        d = d[..., SWAP_XY]
    sign = np.ones(9, d.dtype)
    if fy:
        sign[DY] = -1
    if fx:
        sign[DX] = -1
    return np.moveaxis(d * sign, -1, channel_axis)


def augment_sample(sample: Dict[str, np.ndarray], element: Sequence[int], *,
                   grid: Optional[Tuple[int, int]] = None, probe_grid_origin: str = "center") -> Dict[str, np.ndarray]:
    """The channels-first sample seen through a symmetry (the reference implementation,
    numerically identical to what the pipeline does).

    ``grid = (gx, gy)`` marks ``cbed`` as a probe-grid stack.
    """
    origin = _origin(probe_grid_origin)
    out = {}
    for name, value in sample.items():
        value = np.asarray(value)
        if name == "displacement":
            out[name] = d4_vectors(d4_array(value, element), element, channel_axis=0)
        elif name == "cbed" and grid is not None:
            gx, gy = grid
            k1, k2 = value.shape[-2:]
            g = value.reshape(gy, gx, k1, k2)
            g = d4_array(g, element, axes=(0, 1), origin=origin)
            g = d4_array(g, element, axes=(2, 3))
            out[name] = np.ascontiguousarray(g).reshape(value.shape)
        elif value.ndim >= 2 and name != "params":
            out[name] = np.ascontiguousarray(d4_array(value, element))
        else:
            out[name] = value
    return out


def _origin(name: str) -> float:
    if name not in ("corner", "center"):
        raise UserError(f"probe_grid_origin {name!r}: expected 'corner' or 'center'")
    return 0.0 if name == "corner" else 0.5


# ============================================================================ batch loader
class _Loader:
    """One batch of records → one packed float32 array of channels-last, normalised,
    augmented fields (in a ``tf.numpy_function``), which :meth:`finish` slices into
    named tensors.

    Records are copied (and checked) into one staging buffer, then each output field is
    made in a single compiled pass (:mod:`stemnet.gather`: transpose, symmetry,
    normalisation, vector signs, mask, finiteness check) that releases the GIL.
    """

    def __init__(self, root: Path, manifest: dict, plan: SplitPlan, *, targets, norm: Normalization,
                 augment: bool, noise_std: float, verify_crc, skip_corrupt: bool, seed: int,
                 grid, probe_grid_origin: str, readahead: bool, include_index: bool,
                 include_params: bool):
        if verify_crc not in (True, False, "once"):
            raise UserError(f"verify_crc {verify_crc!r}: expected true, false or 'once'")
        self.root = root
        self.input = input_field(manifest)
        fields = header_fields(manifest)
        self.targets = tuple(targets)
        self.norm = norm
        self.augment = bool(augment)
        self.noise_std = float(noise_std)
        self.verify = bool(verify_crc)
        self.skip_corrupt = bool(skip_corrupt)
        self.seed = int(seed)
        self.rank = plan.rank
        self.batch_size = plan.batch_size
        self.batches_per_epoch = plan.batches_per_epoch
        self.include_index = include_index
        self.include_params = include_params
        self.n_params = len(manifest["param_names"])
        self.readahead = bool(readahead)
        self.shards = [_Shard(root, piece, manifest, self.readahead) for piece in plan.shards]
        self.rec_shard = np.concatenate(
            [np.full(len(s.indices), k, np.int32) for k, s in enumerate(self.shards)])
        self.rec_index = np.concatenate([s.indices for s in self.shards])
        self.slots = self.shards[0].slots  # every shard's header matches the manifest
        self.record_size = RECORD_HEADER.size + self.shards[0].payload
        self.row = -(-self.record_size // 64) * 64  # staging rows stay 64-byte aligned
        self.grid = grid if norm.kind == "cbed" else None
        self.origin = _origin(probe_grid_origin)
        c, h, w = self.input_cf = tuple(fields[self.input].shape)
        labels = [n for n in ("potential", "displacement", "columns") if n in fields]
        self.map_hw = tuple(fields[labels[0]].shape[1:]) if labels else (h, w)
        self.has_columns = "columns" in fields
        square = self.map_hw[0] == self.map_hw[1] and h == w
        square = square and (self.grid is None or self.grid[0] == self.grid[1])
        self.elements = 8 if square else 4
        if augment and norm.kind == "cbed" and self.grid is None:
            raise UserError(
                f"augment: field {self.input!r} has {c} patterns, not a square probe grid; "
                "pass probe_grid=(gx, gy)"
            )
        if "displacement" in self.targets and not self.has_columns:
            log.warning("no 'columns' field: displacement_mask is all ones")
        self.verified = np.zeros(len(self.rec_index), bool) if verify_crc == "once" else None
        self.corrupt = 0
        self._count_lock = threading.Lock()
        self.corrupt_seen: set = set()
        self._tables()
        self._packing()

    def _tables(self):
        """Per symmetry element ``e = 4·transpose + 2·flip_y + flip_x``: the source pixel
        of every output pixel and the source channel of every output channel."""
        elements = [((e >> 2) & 1, (e >> 1) & 1, e & 1) for e in range(8)]
        c = self.input_cf[0]
        self.map_pix = index_table(self.map_hw, elements, d4_array)
        if self.grid is not None:
            gx, gy = self.grid
            self.input_chan = index_table((gy, gx), elements, lambda g, e: d4_array(g, e, origin=self.origin))
        else:
            self.input_chan = np.tile(np.arange(c), (8, 1))
        self.input_pix = index_table(self.input_cf[1:], elements, d4_array)
        self.disp_chan = np.stack([SWAP_XY if e[0] else np.arange(9) for e in elements])
        self.disp_sign = np.ones((8, 9), np.float32)
        for k, (_, fy, fx) in enumerate(elements):
            self.disp_sign[k, DY] = -1.0 if fy else 1.0
            self.disp_sign[k, DX] = -1.0 if fx else 1.0
        self.mask_chan = np.tile(np.repeat(np.arange(3), 3), (8, 1))

    # -- what the numpy side returns
    def outputs(self) -> List[Tuple[str, object, tuple]]:
        """(name, numpy dtype, shape without batch) of the numpy function's results."""
        h, w = self.map_hw
        c, ih, iw = self.input_cf
        out = [("inputs", np.float32, (ih, iw, c))]
        if "potential" in self.targets:
            out.append(("potential", np.float32, (h, w, 1)))
        if "displacement" in self.targets:
            out.append(("displacement", np.float32, (h, w, 9)))
            out.append(("displacement_mask", np.float32, (h, w, 9)))
        out.append(("weight", np.float32, ()))
        if self.include_index:
            out.append(("index", np.int64, ()))
        if self.include_params:
            out.append(("params", np.float32, (self.n_params,)))
        if self.noise_std > 0:
            out.append(("noise_seed", np.int64, (2,)))
        return out

    def _packing(self):
        """(name, shape, start, stop) of each float32 output in a row of the packed batch
        (one numpy-function result instead of several: each costs ~70 µs to hand over),
        and (name, shape) of the int64 outputs returned beside it."""
        self.layout, self.extras, start = [], [], 0
        for name, dtype, shape in self.outputs():
            if dtype == np.float32:
                size = int(np.prod(shape, dtype=np.int64))
                self.layout.append((name, tuple(shape), start, start + size))
                start += size
            else:
                self.extras.append((name, tuple(shape)))
        self.packed_size = start

    def _allocate(self, B: int) -> Dict[str, np.ndarray]:
        """Output arrays: views into one packed ``(B, row)`` float32 buffer, plus extras."""
        packed = _aligned((B, self.packed_size), np.float32)
        arrays = {"packed": packed}
        for name, shape, start, stop in self.layout:
            arrays[name] = packed[:, start:stop].reshape((B,) + shape)
        for name, shape in self.extras:
            arrays[name] = _aligned((B,) + shape, np.int64)
        return arrays

    # -- the per-batch call
    def __call__(self, ids, weights, epoch, batch):
        try:
            return self._load(np.asarray(ids), np.asarray(weights, np.float32).copy(), int(epoch), int(batch))
        except ShardError as error:
            raise ShardError(_ERROR_MARK + str(error)) from None

    def _load(self, ids, weights, epoch, batch):
        B = len(ids)
        rng = np.random.default_rng([self.seed, epoch, self.rank, batch, 0xA06])
        elements = rng.integers(0, self.elements, size=B) if self.augment else np.zeros(B, np.int64)
        shard_of = self.rec_shard[ids]
        index_of = self.rec_index[ids]
        keys = [b"%010d" % k for k in index_of.tolist()]
        stage = self._read(ids, weights, shard_of, keys)
        arrays = self._allocate(B)
        finite = self._assemble(stage, elements, arrays)
        for name, ok in finite.items():
            for i in np.nonzero(~ok)[0].tolist():
                message = (f"{self.shards[shard_of[i]].path}:{keys[i].decode()}: "
                           f"non-finite values (NaN or Inf) in {name}")
                if not self.skip_corrupt:
                    raise ShardError(message)
                self._skip(arrays, i, weights, message, (self.shards[shard_of[i]].path, keys[i]))
        arrays["weight"][:] = weights
        if self.include_index:
            arrays["index"][:] = index_of
        if self.include_params:
            s = self.slots[_shards.PARAMS]
            start = RECORD_HEADER.size + s.offset
            arrays["params"][:] = stage[:, start:start + s.count * s.dtype.itemsize].view(s.dtype)
        if "noise_seed" in arrays:
            arrays["noise_seed"][:] = rng.integers(0, 2**62, size=(B, 2))
        if batch == self.batches_per_epoch - 1 and self.corrupt:
            log.warning("epoch %d: %d corrupt record(s) skipped so far (rank %d)", epoch, self.corrupt, self.rank)
        return (arrays["packed"],) + tuple(arrays[name] for name, _ in self.extras)

    def _read(self, ids, weights, shard_of, keys) -> np.ndarray:
        """The batch's records, checked, one per 64-byte-aligned row of a staging buffer
        (a corrupt record skipped with ``skip_corrupt`` leaves a row of zeros)."""
        stage = _aligned((len(ids), self.row), np.uint8)
        size = self.record_size
        for k in np.unique(shard_of).tolist():
            shard = self.shards[k]
            with _reading(shard.env) as txn:
                for i in np.nonzero(shard_of == k)[0].tolist():
                    key = keys[i]
                    try:
                        raw = txn.get(key)
                        if raw is None:
                            raise ShardError(f"{shard.path}:{key.decode()}: no such record")
                        verify = self.verify and (self.verified is None or not self.verified[ids[i]])
                        shard.check(raw, verify, key)
                        stage[i, :size] = raw
                        if verify and self.verified is not None:
                            self.verified[ids[i]] = True
                    except ShardError as error:
                        if not self.skip_corrupt:
                            raise
                        stage[i] = 0
                        self._skip({}, i, weights, str(error), (shard.path, key))
        return stage

    def _field(self, stage, name) -> np.ndarray:
        """Field ``name`` of every staged record as a float32 ``(B, C, H·W)`` array (a view
        when the stored dtype is aligned float32)."""
        s = self.slots[name]
        start = RECORD_HEADER.size + s.offset
        view = stage[:, start:start + s.count * s.dtype.itemsize].view(s.dtype)
        view = view.reshape(len(stage), s.shape[0], -1)
        if view.dtype != np.float32 or not view.flags.aligned:
            view = view.astype(np.float32)
        return view

    def _assemble(self, stage, elements, arrays) -> Dict[str, np.ndarray]:
        """Fill the output arrays from the staged records; per source field, a ``(B,)``
        array that is False where the record holds NaN or Inf."""
        B = len(stage)
        norm = self.norm
        finite = {}

        def run(field, out, chan, pix, sub, mul, nonlinear="none"):
            src = self._field(stage, field)
            sub = np.broadcast_to(np.asarray(sub, np.float32), (B, chan.shape[1]))
            mul = np.broadcast_to(np.asarray(mul, np.float32), (B, chan.shape[1]))
            flat = out.reshape(B, -1, out.shape[-1])
            finite[field] = gather(src, elements, chan, pix, sub, mul, flat, nonlinear)
            return src

        chan = self.input_chan[elements]
        if norm.method == "none":
            sub, mul, nonlinear = 0.0, 1.0, "none"
        elif norm.kind == "cbed" and norm.method == "standardize":
            src = self._field(stage, self.input)
            mean = src.mean(axis=2, dtype=np.float32)
            std = np.sqrt(np.square(src - mean[..., None]).mean(axis=2)) + np.float32(EPS)
            sub = np.take_along_axis(mean, chan, axis=1)
            mul = np.take_along_axis(np.float32(1.0) / std, chan, axis=1)
            nonlinear = "none"
        elif norm.kind == "cbed":
            sub, mul, nonlinear = 0.0, np.float32(1.0 / norm.scale), norm.method
        else:
            sub = np.asarray(norm.channel_mean, np.float32)[chan]
            mul = (1.0 / np.asarray(norm.channel_std, np.float32))[chan]
            nonlinear = "none"
        run(self.input, arrays["inputs"], self.input_chan, self.input_pix, sub, mul, nonlinear)
        if "potential" in arrays:
            run("potential", arrays["potential"], np.zeros((8, 1), np.int64), self.map_pix,
                np.float32(norm.potential_mean), np.float32(1.0 / norm.potential_std))
        if "displacement" in arrays:
            mul = self.disp_sign[elements] * np.float32(1.0 / norm.displacement_scale)
            run("displacement", arrays["displacement"], self.disp_chan, self.map_pix, 0.0, mul)
            if self.has_columns:
                run("columns", arrays["displacement_mask"], self.mask_chan, self.map_pix, 0.0, 1.0)
            else:
                arrays["displacement_mask"][...] = 1.0
        return finite

    def _skip(self, arrays, i, weights, message, ident):
        weights[i] = 0.0
        for name in ("inputs", "potential", "displacement", "displacement_mask", "params"):
            if name in arrays:
                arrays[name][i] = 0
        with self._count_lock:
            if ident not in self.corrupt_seen:
                self.corrupt_seen.add(ident)
                self.corrupt += 1
                log.warning("skipping corrupt record (%d so far): %s", self.corrupt, message)

    # -- the TF side
    def finish(self, values):
        """Numpy results → ``(inputs, targets)`` (shapes set; noise added as a TF op)."""
        import tensorflow as tf

        B = self.batch_size
        packed, *extras = values
        packed.set_shape((B, self.packed_size))
        named = {name: tf.reshape(packed[:, start:stop], (B,) + shape)
                 for name, shape, start, stop in self.layout}
        for value, (name, shape) in zip(extras, self.extras):
            value.set_shape((B,) + shape)
            named[name] = value
        x = named.pop("inputs")
        if self.noise_std > 0:
            seed = named.pop("noise_seed")[0]  # one draw per batch, from (seed, epoch, rank, batch)
            x = x + tf.random.stateless_normal(tf.shape(x), seed=seed, dtype=tf.float32) * self.noise_std
        return x, named


# ============================================================================ tf.data
def make_dataset(
    path,
    split: str = "train",
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int,
    targets: Sequence[str] = TARGETS,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    repeat=False,
    start_batch: int = 0,
    augment: bool = False,
    cbed_normalization: str = "sqrt",
    noise_std: float = 0.0,
    verify_crc: bool = True,
    skip_corrupt: bool = False,
    deterministic: bool = True,
    probe_grid: Optional[Sequence[int]] = None,
    probe_grid_origin: str = "center",
    include_index: bool = False,
    include_params: bool = False,
    readahead: Optional[bool] = None,
    num_parallel_calls: Optional[int] = None,
    prefetch: Optional[int] = None,
    normalization: Optional[Normalization] = None,
):
    """A ``tf.data.Dataset`` of ``(inputs, targets)`` batches from a sharded dataset.

    Parameters
    ----------
    path : path-like
        Dataset folder (``manifest.json`` + shards), or a folder made by
        :func:`stemnet.stage.stage` for this rank.
    split : {'train', 'val', 'test'}
    rank, world : int
        This process's rank and the number of ranks (see the module notes).
    batch_size : int
        Samples per batch on this rank (the local batch size).
    targets : sequence of {'potential', 'displacement'}
    shuffle, seed : bool, int
        Full reshuffle of the rank's records every epoch, from ``(seed, epoch, rank)``.
    epoch : int
        The first epoch (its order and augmentation draws); for resuming.
    repeat : bool or int
        False: one epoch; True: epochs forever; n: n epochs.
    start_batch : int
        Skip this many batches of the first epoch (exact resume, cheap).
    augment : bool
        Random symmetries of the square (see the module notes).
    cbed_normalization : {'none', 'sqrt', 'log1p', 'standardize'}
        CBED input transform; STEM inputs are standardised per detector unless 'none'.
    noise_std : float
        Std of Gaussian noise added to the normalised inputs.
    verify_crc, skip_corrupt : bool
        Check record CRCs; skip (weight 0, count, log) instead of raising.
    deterministic : bool
        False lets parallel batches come out in any order (their contents are still
        fixed by the seed).
    probe_grid : (gx, gy), optional
        CBED probe grid when the manifest has no simulation config and P is not square.
    probe_grid_origin : {'corner', 'center'}
        Where probe 0 sits; decides how mirrors permute the probe grid.
    include_index, include_params : bool
        Add ``index`` (global sample index) / ``params`` to the targets dict.
    readahead : bool, optional
        OS readahead on the shard maps; default :func:`choose_readahead`.
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

    root = Path(path)
    manifest = read_manifest(root)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UserError(f"target {unknown[0] if unknown else None!r}: expected one or more of {list(TARGETS)}")
    fields = header_fields(manifest)
    for t in targets:
        if t not in fields:
            raise UserError(f"{root}: target {t!r} is not a field of this dataset ({list(fields)})")
    plan = plan_split(manifest, split, rank=rank, world=world, batch_size=batch_size, where=str(root))
    norm = normalization or Normalization.from_manifest(manifest, cbed_normalization)
    grid = _probe_grid(manifest, probe_grid) if norm.kind == "cbed" else None
    loader = _Loader(root, manifest, plan, targets=targets, norm=norm, augment=augment,
                     noise_std=noise_std, verify_crc=verify_crc, skip_corrupt=skip_corrupt,
                     seed=seed, grid=grid, probe_grid_origin=probe_grid_origin,
                     readahead=choose_readahead(manifest, shuffle) if readahead is None else readahead,
                     include_index=include_index,
                     include_params=include_params)
    B = plan.batch_size
    if not 0 <= int(start_batch) < plan.batches_per_epoch:
        raise UserError(f"start_batch {start_batch}: expected 0 <= start_batch < {plan.batches_per_epoch} "
                        "(batches per epoch)")
    if plan.padding:
        log.info("%s %s rank %d/%d: %d samples + %d weight-0 repeats in %d batches per epoch",
                 root, split, rank, world, plan.samples, plan.padding, plan.batches_per_epoch)

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

    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else int(num_parallel_calls)
    ds = epochs.flat_map(per_epoch)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=bool(deterministic))
    ds = ds.prefetch(tf.data.AUTOTUNE if prefetch is None else int(prefetch))
    options = tf.data.Options()
    options.deterministic = bool(deterministic)
    ds = ds.with_options(options)
    ds.stemnet_plan = plan
    ds.stemnet_normalization = norm
    ds._stemnet_loader = loader
    return ds


def corrupt_count(dataset) -> int:
    """Corrupt records skipped so far by a dataset made with ``skip_corrupt=True``
    (the dataset object returned by :func:`make_dataset`, not a derived one)."""
    loader = getattr(dataset, "_stemnet_loader", None)
    return 0 if loader is None else loader.corrupt


# ============================================================================ errors
def user_error(error: BaseException) -> Optional[UserError]:
    """The one-line :class:`UserError` inside a ``tf.errors.OpError`` raised while
    iterating a dataset from :func:`make_dataset`, or None if it holds none."""
    if isinstance(error, UserError):
        return error
    text = getattr(error, "message", None) or str(error)
    for line in text.splitlines():
        at = line.find(_ERROR_MARK)
        if at >= 0:
            return ShardError(line[at + len(_ERROR_MARK):])
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


# ============================================================================ benchmark
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
    envs = [_shard_env(f, readahead) for f in files]
    nbytes, t0 = 0, time.perf_counter()
    txns = [env.begin() for env in envs]
    try:
        for k, key in zip(shard_of.tolist(), keys):
            nbytes += len(txns[k].get(key))
    finally:
        for txn in txns:
            txn.abort()
    return time.perf_counter() - t0, nbytes


def _write_h5(h5: Path, loader: "_Loader", unique: np.ndarray, names: List[str]) -> None:
    import h5py

    with h5py.File(h5, "w") as f:
        datasets = {}
        for row, local in enumerate(unique.tolist()):
            shard = loader.shards[int(loader.rec_shard[local])]
            key = b"%010d" % loader.rec_index[local]
            with shard.env.begin() as txn:
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


def _time_ceiling(loader: "_Loader", warm: int, batches: int) -> float:
    """Seconds for ``batches`` batches of the same tf.data skeleton whose numpy function
    only allocates the packed batch (no reading, no work): the per-batch cost of the
    framework itself, which caps any ``numpy_function`` pipeline at this batch size."""
    import tensorflow as tf

    B = loader.batch_size

    def empty(_):
        return _aligned((B, loader.packed_size), np.float32)

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
    (:func:`_time_ceiling`).

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
        ``ratio_vs_raw_lmdb``, ``ratio_vs_h5py``, ``ceiling_samples_per_s``, ``samples``,
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
    loader, plan = ds._stemnet_loader, ds.stemnet_plan
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
        return order, loader.rec_shard[order], [b"%010d" % i for i in loader.rec_index[order].tolist()]

    order, shard_of, keys = same_records(done)
    samples = len(keys)
    ahead = loader.readahead
    _time_raw(files, shard_of, keys, ahead)  # page cache warm for everyone
    raw_s, nbytes = min(_time_raw(files, shard_of, keys, ahead), _time_raw(files, shard_of, keys, ahead))
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
                  "ceiling_samples_per_s": samples / ceiling_s}
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
