"""The sharded-LMDB dataset format: records, header, manifest, writer, reader, verify.

On disk a dataset is a folder::

    dataset/
      manifest.json                      written by finalize_manifest (atomically)
      train/shard-00000.lmdb             one LMDB environment in a single file
      train/shard-00000.lmdb-lock        LMDB's lock file (writers only; disposable)
      val/shard-00000.lmdb
      test/...

Each shard is an LMDB environment opened with ``subdir=False`` (one data file per
shard, easy to copy or checksum), holding its header (:mod:`~stemnet.shards.header`)
under ``__header__`` and one record (:mod:`~stemnet.shards.records`) per sample under
:func:`sample_key`. Writers: :class:`ShardWriter` then :func:`finalize_manifest`.
Readers: :func:`read_manifest`, :class:`ShardReader` (or :func:`shared_env` for the
training pipeline), :func:`verify_dataset`. Everything a caller needs is imported from
here; the submodules' underscore names are private to this package.
"""

from stemnet.shards.header import (
    HEADER_KEY,
    HEADER_NAME,
    IDENTITY_KEYS,
    SCHEMA_VERSION,
    check_header,
    decode_record,
    header_fields,
    read_header,
    record_keys,
    record_layout,
)
from stemnet.shards.manifest import (
    finalize_manifest,
    read_manifest,
    simulation_section,
)
from stemnet.shards.paths import (
    MANIFEST_NAME,
    SHARD_PATTERN,
    SPLITS,
    is_shard_name,
    manifest_path,
    shard_files,
    shard_location,
    shard_path,
)
from stemnet.shards.reader import (
    ShardReader,
    check_extent,
    close_shards,
    lmdb_errors,
    open_env,
    reading,
    shared_env,
)
from stemnet.shards.records import (
    CRC32_BACKEND,
    FORMAT_VERSION,
    KEY_DIGITS,
    MAGIC,
    PARAMS,
    PARAMS_DTYPE,
    RECORD_HEADER,
    FieldSpec,
    RecordLayout,
    ShardError,
    Slot,
    crc32,
    encode_record,
    key_index,
    key_text,
    sample_key,
)
from stemnet.shards.stats import RunningStats
from stemnet.shards.verify import verify_dataset, verify_shard
from stemnet.shards.writer import ShardWriter

__all__ = [
    "CRC32_BACKEND", "FORMAT_VERSION", "HEADER_KEY", "HEADER_NAME", "IDENTITY_KEYS", "KEY_DIGITS",
    "MAGIC", "MANIFEST_NAME", "PARAMS", "PARAMS_DTYPE", "RECORD_HEADER", "SCHEMA_VERSION",
    "SHARD_PATTERN", "SPLITS", "FieldSpec", "RecordLayout", "RunningStats", "ShardError",
    "ShardReader", "ShardWriter", "Slot", "check_extent", "check_header", "close_shards", "crc32",
    "decode_record", "encode_record", "finalize_manifest", "header_fields", "is_shard_name",
    "key_index", "key_text", "lmdb_errors", "manifest_path", "open_env", "read_header",
    "read_manifest", "reading", "record_keys", "record_layout", "sample_key", "shard_files",
    "shard_location", "shard_path", "shared_env", "simulation_section", "verify_dataset",
    "verify_shard",
]
