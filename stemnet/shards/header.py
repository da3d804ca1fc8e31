"""The shard header: the JSON under ``__header__`` that describes every record of a shard.

It holds the schema version, the ordered fields with shape and little-endian dtype, the
parameter names, the sample count, the writer's ``meta`` (generator, generator_version,
config_digest, seed, ...), the shard's split and index, and per-field statistics. This
module parses it, turns it into a :class:`~stemnet.shards.records.RecordLayout`, and
compares it with the dataset manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from stemnet.shards.records import (
    PARAMS,
    FieldSpec,
    RecordLayout,
    ShardError,
    dtype_str,
)

SCHEMA_VERSION = 1
HEADER_KEY = b"__header__"
HEADER_NAME = HEADER_KEY.decode()
# meta keys that must agree between the shards of one dataset
IDENTITY_KEYS = ("generator", "generator_version", "config_digest", "seed")
REQUIRED_KEYS = ("fields", "param_names", "count", "stats", "meta")


def header_fields(header: dict) -> Dict[str, FieldSpec]:
    """The ordered field specs of a shard header or manifest."""
    return {f["name"]: FieldSpec(tuple(f["shape"]), f["dtype"]) for f in header["fields"]}


def record_layout(header: dict) -> RecordLayout:
    """The record layout of a shard header (or of a manifest: the same fields)."""
    return RecordLayout(header_fields(header), len(header["param_names"]))


def decode_record(header: dict, raw, verify: bool = True, where: str = "record") -> Dict[str, np.ndarray]:
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
    return record_layout(header).decode(raw, verify, where)


def normalise_fields(fields: Dict[str, FieldSpec]) -> Dict[str, FieldSpec]:
    """Field specs with integer shapes and canonical little-endian dtype strings."""
    out = {}
    for name, spec in fields.items():
        if name == PARAMS or not name:
            raise ShardError(f"field name {name!r} is reserved; choose another name")
        shape, dtype = spec
        out[name] = FieldSpec(tuple(int(s) for s in shape), dtype_str(dtype))
    return out


def fields_json(fields: Dict[str, FieldSpec]) -> List[dict]:
    """Field specs as the header's ``fields`` list."""
    return [{"name": n, "shape": list(s.shape), "dtype": s.dtype} for n, s in fields.items()]


def fields_text(fields: Dict[str, FieldSpec]) -> str:
    """Field specs for messages: ``"cbed <f4 [4, 8, 8], ..."``."""
    return ", ".join(f"{n} {s.dtype} {list(s.shape)}" for n, s in fields.items())


def parse_header(raw, path) -> dict:
    """The header dict from its stored bytes, checked for schema version and keys."""
    where = f"{path}:{HEADER_NAME}"
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{where}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("schema_version") != SCHEMA_VERSION:
        found = header.get("schema_version") if isinstance(header, dict) else header
        raise ShardError(f"{where}: schema version {found!r}; expected {SCHEMA_VERSION}")
    for key in REQUIRED_KEYS:
        if key not in header:
            raise ShardError(f"{where}: header has no {key!r} entry")
    return header


def read_header(txn, path, required: bool = True) -> Optional[dict]:
    """The header of the shard open in LMDB transaction ``txn``.

    Returns None when there is none and ``required`` is false; raises otherwise.
    """
    raw = txn.get(HEADER_KEY)
    if raw is None:
        if not required:
            return None
        raise ShardError(f"{path}: no {HEADER_NAME} entry; expected a stemnet shard")
    return parse_header(raw, path)


def record_keys(txn):
    """The record keys (sample keys, in index order) of the shard open in ``txn``."""
    for key in txn.cursor().iternext(keys=True, values=False):
        key = bytes(key)  # a memoryview in a buffers=True transaction
        if not key.startswith(b"__"):
            yield key


# ------------------------------------------------------------------------------ vs manifest
def manifest_entry(manifest: dict, path) -> Optional[dict]:
    """The manifest's ``{"path", "count"}`` entry of shard file ``path`` (None if unlisted)."""
    path = Path(path)
    rel = f"{path.parent.name}/{path.name}"
    for split in manifest.get("splits", {}).values():
        for entry in split["shards"]:
            if entry["path"] == rel:
                return entry
    return None


def _field_faults(where: str, found: Dict[str, FieldSpec], expected: Dict[str, FieldSpec]) -> List[str]:
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
    where = f"{path}:{HEADER_NAME}"
    faults = _field_faults(where, header_fields(header), header_fields(manifest))
    if header["param_names"] != manifest["param_names"]:
        faults.append(
            f"{where}: param names {header['param_names']}; "
            f"the manifest expects {manifest['param_names']}"
        )
    digest, expected = header["meta"].get("config_digest"), manifest.get("config_digest")
    if digest != expected:
        faults.append(f"{where}: config digest {digest!r}; the manifest expects {expected!r}")
    entry = manifest_entry(manifest, path)
    if entry is None:
        faults.append(f"{path}: shard is not listed in the manifest; rerun finalize")
    elif entry["count"] != header["count"]:
        faults.append(
            f"{where}: count {header['count']}; the manifest expects {entry['count']} "
            "(shard changed after finalize?)"
        )
    return faults
