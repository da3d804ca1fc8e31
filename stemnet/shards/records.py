"""One record: a fixed 24-byte header (magic, version, length, CRC-32) + raw field bytes.

A record is ``<4sHHQI4x`` (magic ``b"STSR"``, format version, flags = 0, payload length
in bytes, CRC-32 of the payload, padding) followed by the payload: each field's C-ordered
little-endian bytes in header order, then the ``params`` vector as ``<f8``. Readers decode
with ``np.frombuffer`` at offsets computed from the shard header; nothing is pickled.
The CRC-32 is ISA-L's (:mod:`isal`, several times zlib's speed) when installed, else
zlib's: the same values.
"""

from __future__ import annotations

import struct
import zlib
from typing import Dict, NamedTuple, Sequence, Tuple

import numpy as np

from stemnet.errors import UserError

try:
    from isal.isal_zlib import crc32 as _crc32
    CRC32_BACKEND = "isal"
except ImportError:  # pragma: no cover - isal is a declared dependency
    _crc32 = zlib.crc32
    CRC32_BACKEND = "zlib"

FORMAT_VERSION = 1
MAGIC = b"STSR"
RECORD_HEADER = struct.Struct("<4sHHQI4x")
KEY_DIGITS = 10
PARAMS = "params"
PARAMS_DTYPE = "<f8"


class ShardError(UserError):
    """A problem with a shard or manifest, as one line naming the file or key at fault."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class FieldSpec(NamedTuple):
    """Fixed shape and little-endian dtype string (e.g. ``"<f4"``) of one field."""

    shape: Tuple[int, ...]
    dtype: str


def crc32(data, value: int = 0) -> int:
    """CRC-32 of a bytes-like object (zlib's polynomial and values; ISA-L when present)."""
    return _crc32(data, value)


# ------------------------------------------------------------------------------ keys
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


def as_key(key) -> bytes:
    """A record key from a sample index or a bytes key."""
    return sample_key(key) if isinstance(key, (int, np.integer)) else bytes(key)


def key_text(key: bytes) -> str:
    """A key as printable text for messages."""
    return bytes(key).decode("ascii", "backslashreplace")


def dtype_str(dtype) -> str:
    """Canonical little-endian dtype string: ``float32`` -> ``"<f4"``, ``uint8`` -> ``"|u1"``."""
    return np.dtype(dtype).newbyteorder("<").str


# ------------------------------------------------------------------------------ layout
class Slot(NamedTuple):
    """Where one field sits in a record's payload."""

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    offset: int  # bytes from the start of the payload
    count: int  # elements


class RecordLayout:
    """The byte layout of one shard's records, computed once from its field specs.

    Parameters
    ----------
    fields : dict of str -> FieldSpec
        Field names in payload order (``params`` is appended).
    n_params : int
        Length of the ``<f8`` parameter vector.
    """

    def __init__(self, fields: Dict[str, FieldSpec], n_params: int):
        specs = list(fields.items()) + [(PARAMS, FieldSpec((int(n_params),), PARAMS_DTYPE))]
        slots, offset = [], 0
        for name, (shape, dtype) in specs:
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            slots.append(Slot(name, dt, tuple(shape), offset, count))
            offset += count * dt.itemsize
        self.slots: Dict[str, Slot] = {s.name: s for s in slots}
        self.payload = offset  # bytes
        self.record_size = RECORD_HEADER.size + offset  # bytes

    def check(self, raw, verify: bool = True, where: str = "record") -> None:
        """Raise the one-line :class:`ShardError` naming ``where`` unless ``raw`` is a
        well-formed record of this layout (and, if ``verify``, its CRC-32 holds)."""
        ok = len(raw) == self.record_size
        if ok:
            magic, version, _flags, length, crc = RECORD_HEADER.unpack_from(raw)
            ok = magic == MAGIC and version == FORMAT_VERSION and length == self.payload
            if ok and verify:
                ok = crc32(memoryview(raw)[RECORD_HEADER.size:]) == crc
        if not ok:
            self._diagnose(memoryview(raw).cast("B"), verify, where)

    def _diagnose(self, raw: memoryview, verify: bool, where: str) -> None:
        """The reason a record fails :meth:`check`, as a :class:`ShardError`."""
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
        if length != self.payload:
            raise ShardError(f"{where}: payload of {length} bytes; the shard's fields need {self.payload}")
        if verify:
            computed = crc32(payload)
            if computed != crc:
                raise ShardError(
                    f"{where}: CRC mismatch (stored {crc:#010x}, computed {computed:#010x}); "
                    "the record is corrupt"
                )
        raise ShardError(f"{where}: record does not match the shard layout")  # pragma: no cover

    def decode(self, raw, verify: bool = True, where: str = "record") -> Dict[str, np.ndarray]:
        """``{field: array, ..., "params": vector}``: read-only zero-copy views into ``raw``."""
        self.check(raw, verify, where)
        base = RECORD_HEADER.size
        return {s.name: np.frombuffer(raw, s.dtype, s.count, base + s.offset).reshape(s.shape)
                for s in self.slots.values()}


def encode_record(parts: Sequence[np.ndarray]) -> bytes:
    """A record: fixed header (magic, version, length, CRC-32) + the parts' raw bytes.

    Parts must already be C-contiguous arrays of their little-endian storage dtype.
    """
    views = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in parts]
    crc, length = 0, 0
    for view in views:
        crc = crc32(view, crc)
        length += view.nbytes
    head = RECORD_HEADER.pack(MAGIC, FORMAT_VERSION, 0, length, crc)
    return b"".join([head, *views])
