"""Writing one shard: :class:`ShardWriter` (resumable, kill-safe, one writer per shard).

Records go in under :func:`~stemnet.shards.records.sample_key` (the global sample index,
ten zero-padded decimal digits, so LMDB's byte order is the numeric order). The header
count is rewritten in the same LMDB transaction as the records, so a writer killed at
any point leaves a consistent, readable shard.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lmdb
import numpy as np

from stemnet.shards.header import (
    HEADER_KEY,
    SCHEMA_VERSION,
    fields_json,
    fields_text,
    header_fields,
    normalise_fields,
    read_header,
    record_keys,
)
from stemnet.shards.paths import shard_location
from stemnet.shards.reader import open_env
from stemnet.shards.records import (
    FORMAT_VERSION,
    KEY_DIGITS,
    PARAMS,
    PARAMS_DTYPE,
    FieldSpec,
    ShardError,
    dtype_str,
    encode_record,
    key_index,
    key_text,
    sample_key,
)
from stemnet.shards.stats import RunningStats, channels_of, stats_from_header

try:  # POSIX only: guards against two writers on one shard
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None
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
        self.fields = normalise_fields(fields)
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
        self._env = open_env(self.path, readonly=False, map_size=map_size)
        with self._env.begin() as txn:
            old = read_header(txn, self.path, required=False)
        if old is None:
            self._committed = self._empty_stats()
            self.done: set = set()
            self._commit_batch([])  # the header goes in first: the shard is identifiable
            return
        self._check_identity(old)
        with self._env.begin() as txn:
            self.done = {key_index(k) for k in record_keys(txn)}
        if len(self.done) != old["count"]:
            raise ShardError(
                f"{self.path}: header count {old['count']} but {len(self.done)} records; "
                "the shard is damaged: rewrite it with overwrite=True"
            )
        self._committed = stats_from_header(old)

    def _all_specs(self) -> Dict[str, FieldSpec]:
        return {**self.fields, PARAMS: FieldSpec((len(self.param_names),), PARAMS_DTYPE)}

    def _empty_stats(self) -> Dict[str, RunningStats]:
        return {n: RunningStats(channels_of(s.shape)) for n, s in self._all_specs().items()}

    def _check_identity(self, old: dict) -> None:
        old_digest, new_digest = old["meta"].get("config_digest"), self.meta.get("config_digest")
        if old_digest != new_digest:
            what = f"config digest {old_digest!r} (this writer: {new_digest!r})"
        elif header_fields(old) != self.fields:
            old_fields, new_fields = fields_text(header_fields(old)), fields_text(self.fields)
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
        split, shard = shard_location(self.path)
        return {
            "schema_version": SCHEMA_VERSION,
            "format_version": FORMAT_VERSION,
            "fields": fields_json(self.fields),
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
        where = f"{self.path}:{key_text(key)}"
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
            found = f"{dtype_str(array.dtype)} {list(array.shape)}"
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
    """Whether a write failed because the file system is full."""
    if isinstance(error, lmdb.DiskError):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(error)
