"""The sharded-LMDB dataset format: writer and reader primitives, manifest, checks.

On disk a dataset is a folder::

    dataset/
      manifest.json                      written by finalize_manifest (atomically)
      train/shard-00000.lmdb             one LMDB environment in a single file
      train/shard-00000.lmdb-lock        LMDB's lock file (writers only; disposable)
      val/shard-00000.lmdb
      test/...

Each shard is an LMDB environment opened with ``subdir=False`` (one data file per
shard, easy to copy or checksum). Readers open it with ``lock=False, readonly=True`` and
never touch the ``-lock`` file, so finished shards can live on read-only storage.

Inside a shard:

- key ``__header__``: UTF-8 JSON (see :attr:`ShardWriter.header`): schema version,
  ordered fields with shape and little-endian dtype, parameter names, the sample count,
  the writer's ``meta`` (generator, generator_version, config_digest, seed, ...), the
  shard's split and index, and per-field normalisation statistics;
- one record per sample under :func:`sample_key` (the global sample index, ten
  zero-padded decimal digits, so LMDB's byte order is the numeric order).

A record is a 24-byte header ``<4sHHQI4x`` (magic ``b"STSR"``, format version, flags = 0,
payload length in bytes, CRC-32 of the payload, padding) followed by the payload: each
field's C-ordered little-endian bytes in header order, then the ``params`` vector as
``<f8``. Readers decode with ``np.frombuffer`` at offsets computed from the shard header;
nothing is pickled. The header count is rewritten in the same LMDB transaction as the
records, so a writer killed at any point leaves a consistent, readable shard.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import lmdb
import numpy as np

from stemnet.errors import UserError

try:  # POSIX only: guards against two writers on one shard
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

SCHEMA_VERSION = 1
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MAGIC = b"STSR"
RECORD_HEADER = struct.Struct("<4sHHQI4x")
HEADER_KEY = b"__header__"
KEY_DIGITS = 10
PARAMS = "params"
PARAMS_DTYPE = "<f8"
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.lmdb$")
# meta keys that must agree between the shards of one dataset
IDENTITY_KEYS = ("generator", "generator_version", "config_digest", "seed")


class ShardError(UserError):
    """A problem with a shard or manifest, as one line naming the file or key at fault."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class FieldSpec(NamedTuple):
    """Fixed shape and little-endian dtype string (e.g. ``"<f4"``) of one field."""

    shape: Tuple[int, ...]
    dtype: str


# ------------------------------------------------------------------------------ naming
def shard_path(dataset_dir, split: str, k: int) -> Path:
    """Path of shard ``k`` of ``split``: ``dataset_dir/split/shard-{k:05d}.lmdb``."""
    if split not in SPLITS:
        raise ShardError(f"split {split!r}: expected one of {list(SPLITS)}")
    if k < 0:
        raise ShardError(f"shard index {k}: expected a non-negative integer")
    return Path(dataset_dir) / split / f"shard-{k:05d}.lmdb"


def sample_key(index: int) -> bytes:
    """The fixed-width LMDB key of global sample ``index`` (``b"%010d"``)."""
    index = int(index)
    if not 0 <= index < 10**KEY_DIGITS:
        raise ShardError(f"sample index {index}: expected 0 <= index < 10**{KEY_DIGITS}")
    return b"%010d" % index


def key_index(key: bytes) -> int:
    """The sample index encoded in a record key (inverse of :func:`sample_key`)."""
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise ShardError(f"key {key!r}: expected {KEY_DIGITS} decimal digits")
    return int(key)


def _as_key(key) -> bytes:
    return sample_key(key) if isinstance(key, (int, np.integer)) else bytes(key)


def _key_text(key: bytes) -> str:
    return key.decode("ascii", "backslashreplace")


def _dtype_str(dtype) -> str:
    """Canonical little-endian dtype string: ``float32`` -> ``"<f4"``, ``uint8`` -> ``"|u1"``."""
    return np.dtype(dtype).newbyteorder("<").str


def _normalise_fields(fields: Dict[str, FieldSpec]) -> Dict[str, FieldSpec]:
    out = {}
    for name, spec in fields.items():
        if name == PARAMS or not name:
            raise ShardError(f"field name {name!r} is reserved; choose another name")
        shape, dtype = spec
        out[name] = FieldSpec(tuple(int(s) for s in shape), _dtype_str(dtype))
    return out


def header_fields(header: dict) -> Dict[str, FieldSpec]:
    """The ordered field specs of a shard header or manifest."""
    return {f["name"]: FieldSpec(tuple(f["shape"]), f["dtype"]) for f in header["fields"]}


# ------------------------------------------------------------------------------ records
class _Slot(NamedTuple):
    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    offset: int
    count: int


def _layout(header: dict) -> Tuple[List[_Slot], int]:
    """Field slots (offsets into the payload) and the expected payload length."""
    slots, offset = [], 0
    specs = list(header_fields(header).items())
    specs.append((PARAMS, FieldSpec((len(header["param_names"]),), PARAMS_DTYPE)))
    for name, (shape, dtype) in specs:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        slots.append(_Slot(name, dt, tuple(shape), offset, count))
        offset += count * dt.itemsize
    return slots, offset


def encode_record(parts: Sequence[np.ndarray]) -> bytes:
    """A record: fixed header (magic, version, length, CRC-32) + the parts' raw bytes.

    Parts must already be C-contiguous arrays of their little-endian storage dtype.
    """
    views = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in parts]
    crc, length = 0, 0
    for view in views:
        crc = zlib.crc32(view, crc)
        length += view.nbytes
    head = RECORD_HEADER.pack(MAGIC, FORMAT_VERSION, 0, length, crc)
    return b"".join([head, *views])


def decode_record(
    header: dict, raw, verify: bool = True, where: str = "record"
) -> Dict[str, np.ndarray]:
    """Decode one record's bytes into ``{field: array, ..., "params": vector}``.

    Parameters
    ----------
    header : dict
        The shard header (:attr:`ShardReader.header`) giving field order, shapes, dtypes.
    raw : bytes-like
        The record as stored. Arrays are read-only zero-copy views into it.
    verify : bool
        Check the payload's CRC-32 (magic, version and lengths are always checked).
    where : str
        ``"shard:key"`` used in error messages.

    Raises
    ------
    ShardError
        Wrong magic or version, truncated or over-long payload, CRC mismatch.
    """
    raw = memoryview(raw).cast("B")
    if len(raw) < RECORD_HEADER.size:
        raise ShardError(
            f"{where}: truncated record: {len(raw)} bytes, "
            f"expected at least the {RECORD_HEADER.size}-byte record header"
        )
    magic, version, _flags, length, crc = RECORD_HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ShardError(f"{where}: bad record magic {bytes(magic)!r}; expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ShardError(f"{where}: record format version {version}; expected {FORMAT_VERSION}")
    payload = raw[RECORD_HEADER.size:]
    if len(payload) != length:
        kind = "truncated record" if len(payload) < length else "record longer than it says"
        raise ShardError(f"{where}: {kind}: payload of {len(payload)} bytes, header says {length}")
    slots, expected = _layout(header)
    if length != expected:
        raise ShardError(f"{where}: payload of {length} bytes; the shard's fields need {expected}")
    if verify:
        computed = zlib.crc32(payload)
        if computed != crc:
            raise ShardError(
                f"{where}: CRC mismatch (stored {crc:#010x}, computed {computed:#010x}); "
                "the record is corrupt"
            )
    return {
        s.name: np.frombuffer(payload, s.dtype, s.count, s.offset).reshape(s.shape)
        for s in slots
    }


# ------------------------------------------------------------------------------ statistics
class RunningStats:
    """Count, mean, std, min, max per channel (first axis), mergeable and stable.

    Batches are reduced in float64 (two-pass within a batch) and combined with Chan et
    al.'s parallel update, so shards can be merged in any order. ``std`` is the
    population standard deviation (ddof=0). A 0-d field counts as one channel.

    Parameters
    ----------
    channels : int
        Length of the first axis of the arrays to be accumulated.
    """

    def __init__(self, channels: int):
        self.count = np.zeros(channels, np.int64)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    @property
    def channels(self) -> int:
        return len(self.count)

    def update(self, array) -> "RunningStats":
        """Accumulate one array of shape ``(channels, ...)`` in place; return self."""
        x = np.asarray(array, dtype=np.float64)
        channels = x.shape[0] if x.ndim else 1
        if channels != self.channels:
            raise ShardError(f"statistics: array has {channels} channels, expected {self.channels}")
        if x.size == 0:
            return self
        x = x.reshape(channels, -1)
        batch = RunningStats(self.channels)
        batch.count[:] = x.shape[1]
        batch.mean = x.mean(axis=1)
        batch.m2 = ((x - batch.mean[:, None]) ** 2).sum(axis=1)
        batch.min, batch.max = x.min(axis=1), x.max(axis=1)
        self._absorb(batch)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Statistics of both data sets together (a new object; inputs unchanged)."""
        if other.channels != self.channels:
            raise ShardError(
                f"statistics: cannot merge {other.channels} channels into {self.channels}"
            )
        out = self.copy()
        out._absorb(other)
        return out

    def copy(self) -> "RunningStats":
        out = RunningStats(self.channels)
        for name in ("count", "mean", "m2", "min", "max"):
            setattr(out, name, getattr(self, name).copy())
        return out

    def _absorb(self, other: "RunningStats") -> None:
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * nb / safe
        self.m2 = self.m2 + other.m2 + delta**2 * na * nb / safe
        self.count = self.count + other.count
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    def overall(self) -> dict:
        """Count, mean, std, min, max over all channels together."""
        n = int(self.count.sum())
        if n == 0:
            return {"count": 0, "mean": 0.0, "std": 0.0, "min": None, "max": None}
        mean = float((self.count * self.mean).sum() / n)
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        return {"count": n, "mean": mean, "std": float(np.sqrt(m2 / n)),
                "min": float(self.min.min()), "max": float(self.max.max())}

    def to_dict(self) -> dict:
        """JSON-ready: the overall figures plus ``"channels"`` with per-channel lists."""
        n = np.where(self.count > 0, self.count, 1)
        empty = self.count == 0
        per_channel = {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / n).tolist(),
            "min": [None if e else float(v) for e, v in zip(empty, self.min)],
            "max": [None if e else float(v) for e, v in zip(empty, self.max)],
        }
        return {**self.overall(), "channels": per_channel}

    @classmethod
    def from_dict(cls, data: dict) -> "RunningStats":
        """Inverse of :meth:`to_dict` (the second moment is rebuilt from std and count)."""
        ch = data["channels"]
        out = cls(len(ch["count"]))
        out.count = np.asarray(ch["count"], np.int64)
        out.mean = np.asarray(ch["mean"], np.float64)
        out.m2 = np.asarray(ch["std"], np.float64) ** 2 * out.count
        out.min = np.array([np.inf if v is None else v for v in ch["min"]], np.float64)
        out.max = np.array([-np.inf if v is None else v for v in ch["max"]], np.float64)
        return out


def _channels(shape: Sequence[int]) -> int:
    return int(shape[0]) if len(shape) else 1


def _stats_from_header(header: dict) -> Dict[str, RunningStats]:
    return {name: RunningStats.from_dict(d) for name, d in header["stats"].items()}


# ------------------------------------------------------------------------------ LMDB access
def _open_env(path: Path, *, readonly: bool, readahead: bool = False, map_size: int = 1 << 20):
    """An LMDB environment on a single-file shard; readers take no lock at all."""
    try:
        if readonly:
            return lmdb.open(
                str(path), subdir=False, readonly=True, lock=False, readahead=readahead
            )
        return lmdb.open(str(path), subdir=False, map_size=map_size, readahead=False)
    except lmdb.Error as error:
        raise ShardError(f"{path}: cannot open as an LMDB shard: {error}") from None


def _read_header(env: lmdb.Environment, path: Path) -> Optional[dict]:
    with env.begin() as txn:
        raw = txn.get(HEADER_KEY)
    if raw is None:
        return None
    where = f"{path}:{HEADER_KEY.decode()}"
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{where}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("schema_version") != SCHEMA_VERSION:
        found = header.get("schema_version") if isinstance(header, dict) else header
        raise ShardError(f"{where}: schema version {found!r}; expected {SCHEMA_VERSION}")
    for key in ("fields", "param_names", "count", "stats", "meta"):
        if key not in header:
            raise ShardError(f"{where}: header has no {key!r} entry")
    return header


def _record_keys(txn) -> Iterator[bytes]:
    for key in txn.cursor().iternext(keys=True, values=False):
        if not key.startswith(b"__"):
            yield bytes(key)


def _location(path: Path) -> Tuple[Optional[str], Optional[int]]:
    """(split, shard index) when ``path`` follows the dataset layout, else (None, None)."""
    match = SHARD_PATTERN.match(path.name)
    if match and path.parent.name in SPLITS:
        return path.parent.name, int(match.group(1))
    return None, None


# ------------------------------------------------------------------------------ writer
class ShardWriter:
    """Append samples to one shard; resumable, kill-safe, one writer per shard.

    Parameters
    ----------
    path : path-like
        The shard file (usually :func:`shard_path`); parent folders are created.
    fields : dict of str -> FieldSpec
        Field names in payload order with their shape and dtype.
    param_names : list of str
        Names of the entries of the per-sample parameter vector (stored as ``<f8``).
    meta : dict, optional
        JSON-serialisable provenance kept in the header: ``generator``,
        ``generator_version``, ``config_digest``, ``seed`` and anything else.
    txn_samples : int
        Samples per LMDB transaction (the unit lost when the writer is killed).
    map_size : int
        Initial LMDB map size in bytes; doubled whenever the map is full.
    overwrite : bool
        Discard an existing shard instead of resuming it.

    Raises
    ------
    ShardError
        The existing shard belongs to another dataset (config digest, fields or
        parameter names differ) and ``overwrite`` is false; another writer has it open.

    Notes
    -----
    An existing shard with the same identity is resumed: :attr:`done` holds the indices
    already committed and :meth:`write` skips them. py-lmdb refuses to open one shard
    twice in a process, so close the writer before reading the shard in-process.
    """

    def __init__(self, path, fields: Dict[str, FieldSpec], param_names: Sequence[str],
                 meta: Optional[dict] = None, *, txn_samples: int = 8,
                 map_size: int = 1 << 20, overwrite: bool = False):
        self.path = Path(path)
        self.fields = _normalise_fields(fields)
        self.param_names = [str(p) for p in param_names]
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as error:
            raise ShardError(f"{self.path}: meta is not JSON-serialisable ({error})") from None
        self.txn_samples = max(1, int(txn_samples))
        self._pending: List[Tuple[int, bytes]] = []
        self._pending_index: set = set()
        self._env = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._claim()
        try:
            self._open(int(map_size), overwrite)
        except BaseException:
            if self._env is not None:
                self._env.close()
                self._env = None
            self._release()
            raise

    # -- opening
    def _claim(self) -> Optional[int]:
        """Hold an exclusive flock on the ``-lock`` file: one writer per shard."""
        if fcntl is None:  # pragma: no cover
            return None
        fd = os.open(f"{self.path}-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ShardError(f"{self.path}: another writer has this shard open") from None
            return None  # file system without flock: no guard
        return fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self, map_size: int, overwrite: bool) -> None:
        if overwrite and self.path.exists():
            self.path.unlink()
        self._env = _open_env(self.path, readonly=False, map_size=map_size)
        old = _read_header(self._env, self.path)
        if old is None:
            self._committed = self._empty_stats()
            self.done: set = set()
            self._commit_batch([])  # the header goes in first: the shard is identifiable
            return
        self._check_identity(old)
        with self._env.begin() as txn:
            self.done = {key_index(k) for k in _record_keys(txn)}
        if len(self.done) != old["count"]:
            raise ShardError(
                f"{self.path}: header count {old['count']} but {len(self.done)} records; "
                "the shard is damaged: rewrite it with overwrite=True"
            )
        self._committed = _stats_from_header(old)

    def _all_specs(self) -> Dict[str, FieldSpec]:
        return {**self.fields, PARAMS: FieldSpec((len(self.param_names),), PARAMS_DTYPE)}

    def _empty_stats(self) -> Dict[str, RunningStats]:
        return {n: RunningStats(_channels(s.shape)) for n, s in self._all_specs().items()}

    def _check_identity(self, old: dict) -> None:
        old_digest, new_digest = old["meta"].get("config_digest"), self.meta.get("config_digest")
        if old_digest != new_digest:
            what = f"config digest {old_digest!r} (this writer: {new_digest!r})"
        elif header_fields(old) != self.fields:
            old_fields, new_fields = _fields_text(header_fields(old)), _fields_text(self.fields)
            what = f"fields {old_fields} (this writer: {new_fields})"
        elif old["param_names"] != self.param_names:
            what = f"param names {old['param_names']} (this writer: {self.param_names})"
        else:
            return
        raise ShardError(
            f"{self.path}: existing shard was written with {what}; it belongs to another "
            "dataset: pass overwrite=True or choose another folder"
        )

    # -- state
    @property
    def header(self) -> dict:
        """The header as last committed (pending samples not included)."""
        return self._header(self._committed, len(self.done))

    def _header(self, stats: Dict[str, RunningStats], count: int) -> dict:
        split, shard = _location(self.path)
        return {
            "schema_version": SCHEMA_VERSION,
            "format_version": FORMAT_VERSION,
            "fields": _fields_json(self.fields),
            "param_names": self.param_names,
            "params_dtype": PARAMS_DTYPE,
            "key_format": f"%0{KEY_DIGITS}d",
            "count": count,
            "split": split,
            "shard": shard,
            "meta": self.meta,
            "stats": {n: s.to_dict() for n, s in stats.items()},
        }

    def has(self, index: int) -> bool:
        """Whether sample ``index`` is committed or pending in this shard."""
        return int(index) in self.done or int(index) in self._pending_index

    def __len__(self) -> int:
        return len(self.done) + len(self._pending)

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes."""
        return self._env.info()["map_size"]

    # -- writing
    def write(self, index: int, sample: Dict[str, np.ndarray], params) -> bool:
        """Queue sample ``index``; commit when ``txn_samples`` are queued.

        Returns
        -------
        bool
            False if the index was already present (nothing written), else True.

        Raises
        ------
        ShardError
            The sample's field names, shapes or dtypes, or the params length, differ
            from the shard header; the disk is full.
        """
        if self._env is None:
            raise ShardError(f"{self.path}: writer is closed")
        key = sample_key(index)
        if self.has(index):
            return False
        parts = self._validate(key, sample, params)
        if not self._pending:
            self._pending_stats = self._empty_stats()
        for name, part in zip(self._all_specs(), parts):
            self._pending_stats[name].update(part)
        self._pending.append((int(index), encode_record(parts)))
        self._pending_index.add(int(index))
        if len(self._pending) >= self.txn_samples:
            self.flush()
        return True

    def _validate(self, key: bytes, sample: Dict[str, np.ndarray], params) -> List[np.ndarray]:
        where = f"{self.path}:{_key_text(key)}"
        if set(sample) != set(self.fields):
            missing = sorted(set(self.fields) - set(sample))
            extra = sorted(set(sample) - set(self.fields))
            raise ShardError(
                f"{where}: sample fields differ from the shard header: "
                f"missing {missing}, unexpected {extra}"
            )
        parts = []
        for name, spec in self.fields.items():
            array = np.asarray(sample[name])
            found = f"{_dtype_str(array.dtype)} {list(array.shape)}"
            if found != f"{spec.dtype} {list(spec.shape)}":
                raise ShardError(
                    f"{where}: field {name!r} is {found}; "
                    f"the shard header expects {spec.dtype} {list(spec.shape)}"
                )
            parts.append(np.ascontiguousarray(array, dtype=spec.dtype))
        vector = np.asarray(params, dtype=PARAMS_DTYPE).reshape(-1)
        if vector.size != len(self.param_names):
            raise ShardError(
                f"{where}: params has {vector.size} values; the shard header expects "
                f"{len(self.param_names)} ({', '.join(self.param_names)})"
            )
        parts.append(vector)
        return parts

    def flush(self) -> None:
        """Commit the pending samples together with the updated header."""
        if not self._pending:
            return
        stats = {n: s.merge(self._pending_stats[n]) for n, s in self._committed.items()}
        self._commit_batch(self._pending, stats)
        self._committed = stats
        self.done.update(i for i, _ in self._pending)
        self._pending, self._pending_index = [], set()

    def _commit_batch(self, items: List[Tuple[int, bytes]], stats=None) -> None:
        stats = self._committed if stats is None else stats
        header = json.dumps(self._header(stats, len(self.done) + len(items))).encode()
        while True:
            try:
                self._put_batch(items, header)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(2 * self.map_size)
            except (lmdb.Error, OSError) as error:
                if not _is_disk_full(error):
                    raise
                self._pending, self._pending_index = [], set()
                raise ShardError(
                    f"{self.path}: disk full (no space left on device); "
                    f"{len(self.done)} samples are committed and readable, "
                    f"{len(items)} pending samples were not written"
                ) from None

    def _put_batch(self, items: List[Tuple[int, bytes]], header: bytes) -> None:
        """One transaction: the records and the header, all or nothing."""
        with self._env.begin(write=True) as txn:
            for index, record in items:
                txn.put(sample_key(index), record)
            txn.put(HEADER_KEY, header)

    def close(self) -> None:
        """Commit pending samples and close the shard (idempotent)."""
        if self._env is None:
            return
        try:
            self.flush()
        finally:
            self._env.close()
            self._env = None
            self._release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, lmdb.DiskError):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(error)


def _fields_json(fields: Dict[str, FieldSpec]) -> List[dict]:
    return [{"name": n, "shape": list(s.shape), "dtype": s.dtype} for n, s in fields.items()]


def _fields_text(fields: Dict[str, FieldSpec]) -> str:
    return ", ".join(f"{n} {s.dtype} {list(s.shape)}" for n, s in fields.items())


# ------------------------------------------------------------------------------ reader
class ShardReader:
    """Read-only access to one shard.

    Parameters
    ----------
    path : path-like
        The shard file.
    verify : bool
        Check each record's CRC-32 in :meth:`read`.
    readahead : bool
        OS readahead on the memory map: True for sequential scans, False for random
        access (the training pipeline).
    manifest : dict, optional
        If given, the header must agree with it (fields, params, digest, count).

    Raises
    ------
    ShardError
        Missing file, not an LMDB file, no or unreadable header, disagreement with the
        manifest.
    """

    def __init__(self, path, *, verify: bool = True, readahead: bool = False,
                 manifest: Optional[dict] = None):
        self.path = Path(path)
        self.verify = verify
        if not self.path.is_file():
            raise ShardError(f"{self.path}: no such shard file")
        self._env = _open_env(self.path, readonly=True, readahead=readahead)
        try:
            header = _read_header(self._env, self.path)
            if header is None:
                raise ShardError(
                    f"{self.path}: no {HEADER_KEY.decode()} entry; expected a stemnet shard"
                )
            self.header = header
            if manifest is not None:
                faults = check_header(header, manifest, self.path)
                if faults:
                    raise ShardError(faults[0])
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return int(self.header["count"])

    def _begin(self):
        if self._env is None:
            raise ShardError(f"{self.path}: reader is closed")
        return self._env.begin()

    def keys(self) -> List[bytes]:
        """Record keys in sorted (= sample index) order."""
        with self._begin() as txn:
            return list(_record_keys(txn))

    def indices(self) -> List[int]:
        """Sample indices in this shard, ascending."""
        return [key_index(k) for k in self.keys()]

    def read_raw(self, key) -> bytes:
        """The stored record bytes of ``key`` (bytes key or sample index)."""
        key = _as_key(key)
        with self._begin() as txn:
            raw = txn.get(key)
        if raw is None:
            raise ShardError(f"{self.path}:{_key_text(key)}: no such record")
        return raw

    def read(self, key) -> Dict[str, np.ndarray]:
        """Decoded sample ``{field: array, ..., "params": vector}`` (read-only arrays)."""
        key = _as_key(key)
        return self._decode(key, self.read_raw(key))

    def _decode(self, key: bytes, raw: bytes) -> Dict[str, np.ndarray]:
        return decode_record(self.header, raw, self.verify, f"{self.path}:{_key_text(key)}")

    def items(self) -> Iterator[Tuple[bytes, Dict[str, np.ndarray]]]:
        """``(key, sample)`` for every record, in key order, in one read transaction."""
        for key, raw in self.iter_raw():
            yield key, self._decode(key, raw)

    def iter_raw(self) -> Iterator[Tuple[bytes, bytes]]:
        """``(key, record bytes)`` for every record, in key order."""
        with self._begin() as txn:
            for key, raw in txn.cursor():
                if not key.startswith(b"__"):
                    yield bytes(key), bytes(raw)

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ manifest
def _manifest_path(dataset_dir) -> Path:
    return Path(dataset_dir) / MANIFEST_NAME


def _shard_files(dataset_dir: Path, split: str) -> List[Path]:
    folder = dataset_dir / split
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_PATTERN.match(p.name) and p.is_file())


def _merge_stats(a: Optional[dict], b: dict) -> dict:
    return dict(b) if a is None else {name: s.merge(b[name]) for name, s in a.items()}


def finalize_manifest(dataset_dir, extra: Optional[dict] = None) -> dict:
    """Build ``manifest.json`` from the shard headers and write it atomically.

    Parameters
    ----------
    dataset_dir : path-like
        The dataset folder holding ``train/``, ``val/``, ``test/`` shards. No writer
        may have a shard open in this process (py-lmdb opens an environment once).
    extra : dict, optional
        JSON-serialisable data stored under ``"extra"`` (e.g. the simulation config).

    Returns
    -------
    dict
        The manifest. ``stats`` holds per-field statistics merged over the ``train``
        split (over all splits if train is empty; see ``stats_from``); each split
        entry also has its own ``stats``.

    Raises
    ------
    ShardError
        No shards, or shards that disagree on fields, parameters or provenance.
    """
    dataset_dir = Path(dataset_dir)
    first, splits = None, {}
    for split in SPLITS:
        shards, stats = [], None
        for path in _shard_files(dataset_dir, split):
            with ShardReader(path, verify=False) as reader:
                header = reader.header
            first = first or (path, header)
            _check_same_dataset(first, path, header)
            shards.append({"path": f"{split}/{path.name}", "count": header["count"]})
            stats = _merge_stats(stats, _stats_from_header(header))
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards, "stats": stats}
    if first is None:
        raise ShardError(
            f"{dataset_dir}: no shards; expected {{train,val,test}}/shard-NNNNN.lmdb files"
        )
    manifest = _manifest_from(first[1], splits, extra)
    _write_json_atomic(_manifest_path(dataset_dir), manifest)
    return manifest


def _check_same_dataset(first: Tuple[Path, dict], path: Path, header: dict) -> None:
    ref_path, ref = first
    for key in IDENTITY_KEYS:
        mine, theirs = header["meta"].get(key), ref["meta"].get(key)
        if mine != theirs:
            raise ShardError(
                f"{path}: meta {key}={mine!r} but {ref_path} has {theirs!r}; "
                "the shards of one dataset must agree"
            )
    for key in ("fields", "param_names"):
        if header[key] != ref[key]:
            raise ShardError(
                f"{path}: {key} {header[key]} differ from {ref_path} ({ref[key]}); "
                "the shards of one dataset must agree"
            )


def _manifest_from(header: dict, splits: dict, extra: Optional[dict]) -> dict:
    used = ["train"] if splits["train"]["count"] else [s for s in SPLITS if splits[s]["count"]]
    merged = None
    for split in used:
        merged = _merge_stats(merged, splits[split]["stats"])
    for entry in splits.values():
        entry["stats"] = {n: s.to_dict() for n, s in (entry["stats"] or {}).items()}
    return {
        "schema_version": SCHEMA_VERSION,
        "format_version": FORMAT_VERSION,
        "fields": header["fields"],
        "param_names": header["param_names"],
        "params_dtype": PARAMS_DTYPE,
        **{key: header["meta"].get(key) for key in IDENTITY_KEYS},
        "splits": splits,
        "total": sum(splits[s]["count"] for s in SPLITS),
        "stats": {n: s.to_dict() for n, s in (merged or {}).items()},
        "stats_from": used,
        "extra": extra or {},
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside ``path``, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest(dataset_dir) -> dict:
    """The dataset's manifest.

    Raises
    ------
    ShardError
        Missing or unreadable ``manifest.json``, or a different schema version.
    """
    path = _manifest_path(dataset_dir)
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest; expected one written by `stemnet simulate --finalize`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: schema version {found!r}; expected {SCHEMA_VERSION}")
    return manifest


def _manifest_entry(manifest: dict, path: Path) -> Optional[dict]:
    rel = f"{path.parent.name}/{path.name}"
    for split in manifest.get("splits", {}).values():
        for entry in split["shards"]:
            if entry["path"] == rel:
                return entry
    return None


def _field_faults(where: str, found: Dict[str, FieldSpec], expected: Dict[str, FieldSpec]):
    faults = []
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            faults.append(f"{where}: field {name!r} missing; the manifest lists it")
        elif name not in expected:
            faults.append(f"{where}: field {name!r} is not in the manifest")
        elif found[name] != expected[name]:
            have, want = found[name], expected[name]
            faults.append(
                f"{where}: field {name!r} is {have.dtype} {list(have.shape)}; "
                f"the manifest expects {want.dtype} {list(want.shape)}"
            )
    if not faults and list(found) != list(expected):
        faults.append(f"{where}: field order {list(found)}; the manifest expects {list(expected)}")
    return faults


def check_header(header: dict, manifest: dict, path) -> List[str]:
    """Ways a shard header disagrees with the manifest, one line each (empty if none)."""
    path = Path(path)
    where = f"{path}:{HEADER_KEY.decode()}"
    faults = _field_faults(where, header_fields(header), header_fields(manifest))
    if header["param_names"] != manifest["param_names"]:
        faults.append(
            f"{where}: param names {header['param_names']}; "
            f"the manifest expects {manifest['param_names']}"
        )
    digest, expected = header["meta"].get("config_digest"), manifest.get("config_digest")
    if digest != expected:
        faults.append(f"{where}: config digest {digest!r}; the manifest expects {expected!r}")
    entry = _manifest_entry(manifest, path)
    if entry is None:
        faults.append(f"{path}: shard is not listed in the manifest; rerun finalize")
    elif entry["count"] != header["count"]:
        faults.append(
            f"{where}: count {header['count']}; the manifest expects {entry['count']} "
            "(shard changed after finalize?)"
        )
    return faults


def verify_dataset(dataset_dir) -> List[str]:
    """Check a whole dataset: every record's CRC, every header against the manifest.

    Returns
    -------
    list of str
        One line per fault (empty when the dataset is sound): missing manifest or
        shards, header/manifest disagreements, records that fail to decode, header
        counts that differ from the records, duplicated sample indices, shards on
        disk that the manifest does not list.
    """
    dataset_dir = Path(dataset_dir)
    try:
        manifest = read_manifest(dataset_dir)
    except ShardError as error:
        return [str(error)]
    faults, owner, listed = [], {}, set()
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            listed.add(shard["path"])
            faults += _verify_shard(dataset_dir / shard["path"], manifest, owner)
        total = sum(s["count"] for s in entry["shards"])
        if total != entry["count"]:
            faults.append(
                f"{_manifest_path(dataset_dir)}: split {split!r} count {entry['count']}; "
                f"its shards sum to {total}"
            )
    for split in SPLITS:
        for path in _shard_files(dataset_dir, split):
            if f"{split}/{path.name}" not in listed:
                faults.append(f"{path}: shard is not listed in the manifest; rerun finalize")
    return faults


def _verify_shard(path: Path, manifest: dict, owner: Dict[int, Path]) -> List[str]:
    """Faults of one shard; ``owner`` maps sample index -> shard, to catch duplicates."""
    try:
        reader = ShardReader(path, verify=True, readahead=True)
    except ShardError as error:
        return [str(error)]
    with reader:
        faults = check_header(reader.header, manifest, path)
        records = 0
        for key, raw in reader.iter_raw():
            records += 1
            where = f"{path}:{_key_text(key)}"
            try:
                index = key_index(key)
                decode_record(reader.header, raw, True, where)
            except ShardError as error:
                message = str(error)
                faults.append(message if message.startswith(str(path)) else f"{path}: {message}")
                continue
            if index in owner:
                faults.append(f"{where}: sample {index} is also in {owner[index]}")
            owner[index] = path
        if records != len(reader):
            faults.append(
                f"{path}:{HEADER_KEY.decode()}: count {len(reader)} "
                f"but the shard holds {records} records"
            )
    return faults
