"""Checking a dataset end to end: every header against the manifest, every record's
CRC-32, counts, duplicated indices, unlisted shards (:func:`verify_dataset`)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from stemnet.shards.header import HEADER_NAME, check_header
from stemnet.shards.manifest import read_manifest
from stemnet.shards.paths import SPLITS, manifest_path, shard_files
from stemnet.shards.reader import ShardReader
from stemnet.shards.records import ShardError, key_index, key_text


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
            faults += verify_shard(dataset_dir / shard["path"], manifest, owner)
        total = sum(s["count"] for s in entry["shards"])
        if total != entry["count"]:
            faults.append(
                f"{manifest_path(dataset_dir)}: split {split!r} count {entry['count']}; "
                f"its shards sum to {total}"
            )
    for split in SPLITS:
        for path in shard_files(dataset_dir, split):
            if f"{split}/{path.name}" not in listed:
                faults.append(f"{path}: shard is not listed in the manifest; rerun finalize")
    return faults


def verify_shard(path, manifest: dict, owner: Optional[Dict[int, Path]] = None) -> List[str]:
    """Faults of one shard, one line each: header vs manifest, every record decoded with
    its CRC checked, the count; ``owner`` (sample index -> shard, filled in) catches
    indices that several shards hold."""
    path = Path(path)
    owner = {} if owner is None else owner
    try:
        reader = ShardReader(path, verify=True, readahead=True)
    except ShardError as error:
        return [str(error)]
    with reader:
        faults = check_header(reader.header, manifest, path)
        records = 0
        try:
            for key, raw in reader.iter_raw():
                records += 1
                where = f"{path}:{key_text(key)}"
                try:
                    index = key_index(key)
                    reader.layout.check(raw, True, where)
                except ShardError as error:
                    message = str(error)
                    faults.append(message if message.startswith(str(path)) else f"{path}: {message}")
                    continue
                if index in owner:
                    faults.append(f"{where}: sample {index} is also in {owner[index]}")
                owner[index] = path
        except ShardError as error:  # a damaged LMDB page: the rest of the shard is unreadable
            faults.append(str(error))
            return faults
        if records != len(reader):
            faults.append(
                f"{path}:{HEADER_NAME}: count {len(reader)} "
                f"but the shard holds {records} records"
            )
    return faults
