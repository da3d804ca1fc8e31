"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``.

A reader (or a rerun after a kill) sees either the old file or the complete new one,
never a half-written file; the data is on disk before the name points at it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Union

Data = Union[str, bytes]


def temporary_path(path) -> Path:
    """The hidden temporary name used beside ``path`` by this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path to write (by any library) that replaces ``path`` on success.

    The file written there is fsynced and renamed over ``path`` when the block exits
    without an exception; otherwise it is removed and ``path`` is unchanged.

    >>> with atomic_path("out.h5") as tmp:  # doctest: +SKIP
    ...     h5py.File(tmp, "w").close()
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path, data: Data) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; return the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(raw)
    return Path(path)


def write_json_atomic(path, obj, indent: int = 1) -> Path:
    """``obj`` as JSON (plus a final newline) to ``path`` atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent) + "\n")
