"""Where the files of a dataset live: ``manifest.json`` and ``{split}/shard-{k:05d}.lmdb``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

from stemnet.shards.records import ShardError

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.lmdb$")


def shard_path(dataset_dir, split: str, k: int) -> Path:
    """Path of shard ``k`` of ``split``: ``dataset_dir/split/shard-{k:05d}.lmdb``."""
    if split not in SPLITS:
        raise ShardError(f"split {split!r}: expected one of {list(SPLITS)}")
    if k < 0:
        raise ShardError(f"shard index {k}: expected a non-negative integer")
    return Path(dataset_dir) / split / f"shard-{k:05d}.lmdb"


def is_shard_name(name: str) -> bool:
    """Whether a file name is a shard's (``shard-NNNNN.lmdb``)."""
    return SHARD_PATTERN.match(name) is not None


def shard_location(path) -> Tuple[Optional[str], Optional[int]]:
    """(split, shard index) when ``path`` follows the dataset layout, else (None, None)."""
    path = Path(path)
    match = SHARD_PATTERN.match(path.name)
    if match and path.parent.name in SPLITS:
        return path.parent.name, int(match.group(1))
    return None, None


def shard_files(dataset_dir, split: str) -> List[Path]:
    """The shard files present on disk in ``dataset_dir/split``, sorted."""
    folder = Path(dataset_dir) / split
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_shard_name(p.name) and p.is_file())


def manifest_path(dataset_dir) -> Path:
    """``dataset_dir/manifest.json``."""
    return Path(dataset_dir) / MANIFEST_NAME
