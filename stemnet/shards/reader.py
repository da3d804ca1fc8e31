"""Opening shards: the one LMDB open (with a size check), :class:`ShardReader`, and the
process-wide cache of read-only environments the training pipeline shares.

Readers open a shard with ``lock=False, readonly=True`` and never touch the ``-lock``
file, so finished shards can live on read-only storage. LMDB memory-maps the file and
trusts it: a page past the end of a truncated file is a SIGBUS, not an error. So before
mapping, :func:`open_env` reads the two meta pages and refuses a file shorter than the
last page its newest committed transaction uses.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import lmdb
import numpy as np

from stemnet.shards.header import read_header, record_keys, check_header, record_layout
from stemnet.shards.records import ShardError, as_key, key_index, key_text

# LMDB's meta page on a 64-bit little-endian machine (lmdb/mdb.c: MDB_page + MDB_meta):
# a 16-byte page header, then magic, version, address, map size, two MDB_db records
# (the free DB's md_pad holds the page size) and the last used page number and txn id.
LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II8xQI44x48xQQ")  # magic, version, mapsize, psize, last_pg, txnid
_META_OFFSET = 16
_MIN_PAGE = 512


def _lmdb_extent(path: Path, size: int) -> int:
    """Bytes the newest valid meta page of an LMDB file says the file holds."""
    with open(path, "rb") as handle:
        first = handle.read(_META_OFFSET + _META.size)
        if len(first) < _META_OFFSET + _META.size:
            raise ShardError(f"{path}: cannot open as an LMDB shard: file of {size} bytes is "
                             "shorter than an LMDB meta page (truncated or not an LMDB file)")
        metas = [_META.unpack_from(first, _META_OFFSET)]
        psize = metas[0][3]
        if metas[0][0] == LMDB_MAGIC and _MIN_PAGE <= psize <= 1 << 16:
            handle.seek(psize)
            second = handle.read(_META_OFFSET + _META.size)
            if len(second) == _META_OFFSET + _META.size:
                metas.append(_META.unpack_from(second, _META_OFFSET))
    valid = [m for m in metas if m[0] == LMDB_MAGIC and _MIN_PAGE <= m[3] <= 1 << 16]
    if not valid:
        raise ShardError(f"{path}: cannot open as an LMDB shard: no valid LMDB meta page "
                         "(damaged or not an LMDB file)")
    _magic, _version, _mapsize, psize, last_pg, _txnid = max(valid, key=lambda m: m[5])
    return (last_pg + 1) * psize


def check_extent(path) -> None:
    """Refuse an LMDB file shorter than its last committed page (it would SIGBUS on read)."""
    path = Path(path)
    size = path.stat().st_size
    need = _lmdb_extent(path, size)
    if size < need:
        raise ShardError(f"{path}: cannot open as an LMDB shard: file of {size} bytes but its last "
                         f"committed page ends at byte {need} (truncated or damaged); "
                         "copy or simulate it again")


def open_env(path, *, readonly: bool, readahead: bool = False, map_size: int = 1 << 20,
             max_spare_txns: int = 1) -> lmdb.Environment:
    """An LMDB environment on a single-file shard (readers take no lock at all).

    The only place a shard is opened. A reader's file must exist; an existing file is
    checked against LMDB's last committed page first (:func:`check_extent`).

    Raises
    ------
    ShardError
        ``"{path}: cannot open as an LMDB shard: {reason}"``, or no such shard file.
    """
    path = Path(path)
    if readonly and not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    if path.is_file() and (readonly or path.stat().st_size > 0):
        check_extent(path)
    try:
        if readonly:
            return lmdb.open(str(path), subdir=False, readonly=True, lock=False,
                             readahead=readahead, max_spare_txns=max_spare_txns)
        return lmdb.open(str(path), subdir=False, map_size=map_size, readahead=False)
    except lmdb.Error as error:
        raise ShardError(f"{path}: cannot open as an LMDB shard: {error}") from None


@contextlib.contextmanager
def lmdb_errors(path) -> Iterator[None]:
    """LMDB errors while reading (a damaged page) as one-line :class:`ShardError`."""
    try:
        yield
    except lmdb.Error as error:
        raise ShardError(f"{path}: damaged LMDB shard ({type(error).__name__}: {error})") from None


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
        Missing file, not an LMDB file, truncated, no or unreadable header,
        disagreement with the manifest.
    """

    def __init__(self, path, *, verify: bool = True, readahead: bool = False,
                 manifest: Optional[dict] = None):
        self.path = Path(path)
        self.verify = verify
        self._env = open_env(self.path, readonly=True, readahead=readahead)
        try:
            with lmdb_errors(self.path), self._env.begin() as txn:
                self.header = read_header(txn, self.path)
            self.layout = record_layout(self.header)
            if manifest is not None:
                faults = check_header(self.header, manifest, self.path)
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
        with lmdb_errors(self.path), self._begin() as txn:
            return list(record_keys(txn))

    def indices(self) -> List[int]:
        """Sample indices in this shard, ascending."""
        return [key_index(k) for k in self.keys()]

    def read_raw(self, key) -> bytes:
        """The stored record bytes of ``key`` (bytes key or sample index)."""
        key = as_key(key)
        with lmdb_errors(self.path), self._begin() as txn:
            raw = txn.get(key)
        if raw is None:
            raise ShardError(f"{self.path}:{key_text(key)}: no such record")
        return raw

    def read(self, key) -> Dict[str, np.ndarray]:
        """Decoded sample ``{field: array, ..., "params": vector}`` (read-only arrays)."""
        key = as_key(key)
        return self.decode(key, self.read_raw(key))

    def decode(self, key: bytes, raw, verify: Optional[bool] = None) -> Dict[str, np.ndarray]:
        """Record bytes of ``key`` decoded with this shard's layout."""
        verify = self.verify if verify is None else verify
        return self.layout.decode(raw, verify, f"{self.path}:{key_text(key)}")

    def items(self) -> Iterator[Tuple[bytes, Dict[str, np.ndarray]]]:
        """``(key, sample)`` for every record, in key order, in one read transaction."""
        for key, raw in self.iter_raw():
            yield key, self.decode(key, raw)

    def iter_raw(self) -> Iterator[Tuple[bytes, bytes]]:
        """``(key, record bytes)`` for every record, in key order."""
        with lmdb_errors(self.path), self._begin() as txn:
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


# ------------------------------------------------------------------------------ shared cache
_ENVS: Dict[Tuple[int, str], lmdb.Environment] = {}
_ENV_LOCK = threading.Lock()
_ENV_IDLE = threading.Condition(_ENV_LOCK)  # signalled when a read transaction ends
_ENV_BUSY: Dict[int, int] = {}  # id(env) -> read transactions in flight


def shared_env(path, readahead: bool = False) -> lmdb.Environment:
    """The process's one read-only environment on ``path`` (opened on first use; py-lmdb
    refuses a second handle on one file in a process)."""
    key = (os.getpid(), str(Path(path).resolve()))
    with _ENV_LOCK:
        env = _ENVS.get(key)
        if env is None:
            env = open_env(path, readonly=True, readahead=readahead, max_spare_txns=4)
            _ENVS[key] = env
        return env


@contextlib.contextmanager
def reading(env: lmdb.Environment, path="shard"):
    """A zero-copy read transaction on a :func:`shared_env` that :func:`close_shards`
    waits for: closing an environment under a transaction still decoding from its
    buffers would crash the process (a prefetching dataset's threads can outlive the loop
    that iterated it). LMDB errors become :class:`ShardError` naming ``path``."""
    with _ENV_IDLE:
        _ENV_BUSY[id(env)] = _ENV_BUSY.get(id(env), 0) + 1
    try:
        with lmdb_errors(path), env.begin(buffers=True) as txn:
            yield txn
    finally:
        with _ENV_IDLE:
            _ENV_BUSY[id(env)] -= 1
            _ENV_IDLE.notify_all()


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
