"""One batch of records → one packed float32 array: read, check, then one compiled
gather per field (channels-first → channels-last, symmetry, normalisation, vector and axial-vector signs,
mask, NaN/Inf check).

A batch is one ``tf.numpy_function`` call (:class:`BatchLoader`): one LMDB transaction
per shard, each record checked (the shard's :class:`~stemnet.shards.RecordLayout`) and
copied into a staging buffer; then each output field is made in one compiled pass
(:func:`gather`) that releases the GIL, straight into one packed float32 batch (one
hand-over to TensorFlow, which slices it into the named tensors). A failing record
raises a one-line :class:`~stemnet.shards.ShardError` naming shard and key, or with
``skip_corrupt`` is replaced by a weight-0 sample, counted and logged. NaN or Inf in a
record raises (or is skipped) the same way.

Every output is a gather::

    out[b, j, c] = g((src[b, chan[e, c], pix[e, j]] - sub[b, c]) * mul[b, c]),  e = elements[b]

with ``src`` a batch of one channels-first field flattened to ``(B, C_in, N)`` (``N = H·W``
pixels), ``out`` ``(B, N, C)`` (channels-last), the index tables of
:class:`~stemnet.data.augment.GatherTables`, ``sub``/``mul``/``g`` from
:meth:`~stemnet.data.normalization.Normalization.input_terms` (and vector signs).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from stemnet.data.assignment import ShardSlice, SplitPlan
from stemnet.data.augment import GatherTables, grid_origin
from stemnet.data.layout import input_field, map_shape, tilt_target
from stemnet.data.normalization import Normalization
from stemnet.errors import UserError
from stemnet.log import get_logger
from stemnet.shards import (
    PARAMS,
    header_fields,
    RECORD_HEADER,
    ShardError,
    check_header,
    key_index,
    key_text,
    read_header,
    reading,
    record_keys,
    record_layout,
    sample_key,
    shared_env,
)

log = get_logger("data")

ERROR_MARK = "stemnet-data-error: "  # finds our one-line message inside a TF error


# ============================================================================ the kernel
NONLINEAR = {"none": 0, "sqrt": 1, "log1p": 2}

_kernel = None


def _compiled():
    """The numba kernel, compiled on first use (cached on disk by numba)."""
    global _kernel
    if _kernel is None:
        import numba

        @numba.njit(nogil=True, cache=True, boundscheck=False)
        def gather(src, elements, chan, pix, sub, mul, nonlinear, out, finite):
            n_batch, n_pix, n_chan = out.shape
            for b in range(n_batch):
                e = elements[b]
                ok = True
                for j in range(n_pix):
                    s = pix[e, j]
                    for c in range(n_chan):
                        v = src[b, chan[e, c], s]
                        if not v - v == 0.0:  # NaN or Inf
                            ok = False
                        v = (v - sub[b, c]) * mul[b, c]
                        if nonlinear == 1:
                            v = np.sqrt(max(v, np.float32(0.0)))
                        elif nonlinear == 2:
                            v = np.log1p(max(v, np.float32(0.0)))
                        out[b, j, c] = v
                finite[b] = ok

        _kernel = gather
    return _kernel


def gather(src: np.ndarray, elements: np.ndarray, chan: np.ndarray, pix: np.ndarray,
           sub: np.ndarray, mul: np.ndarray, out: np.ndarray, nonlinear: str = "none") -> np.ndarray:
    """Fill ``out`` (see the module notes); returns a ``(B,)`` bool array, False where a
    sample's source values include NaN or Inf.

    ``src`` (B, C_in, N) float32 (any strides); ``elements`` (B,) int; ``chan`` (E, C) and
    ``pix`` (E, N) int; ``sub``/``mul`` (B, C) float32; ``out`` (B, N, C) float32.
    """
    finite = np.empty(len(out), np.bool_)
    _compiled()(src, np.asarray(elements, np.int64), chan, pix, np.asarray(sub, np.float32),
                np.asarray(mul, np.float32), NONLINEAR[nonlinear], out, finite)
    return finite


# ============================================================================ records
class ShardRecords:
    """One open shard as a rank reads it: its header, record layout and this rank's keys."""

    def __init__(self, root: Path, piece: ShardSlice, manifest: dict, readahead: bool):
        self.path = root / piece.path
        if not self.path.is_file():
            staged = manifest.get("staged")
            hint = ""
            if staged:
                hint = (f" (this folder was staged for rank {staged.get('rank')} of "
                        f"{staged.get('world')}; stage it for this rank)")
            raise ShardError(f"{self.path}: no such shard file; the manifest lists it{hint}")
        self.env = shared_env(self.path, readahead)
        with reading(self.env, self.path) as txn:
            self.header = read_header(txn, self.path)
            keys = [key_index(k) for k in record_keys(txn)]
        faults = check_header(self.header, manifest, self.path)
        if faults:
            raise ShardError(faults[0])
        if len(keys) != piece.total:
            raise ShardError(
                f"{self.path}: holds {len(keys)} records; the manifest and header say {piece.total}"
            )
        self.indices = np.asarray(keys[piece.offset::piece.stride], np.int64)
        self.layout = record_layout(self.header)

    def where(self, key: bytes) -> str:
        return f"{self.path}:{key_text(key)}"

    def decode(self, raw, verify: bool, key: bytes) -> Dict[str, np.ndarray]:
        """Record ``key``'s bytes decoded (checked; CRC-32 too if ``verify``)."""
        return self.layout.decode(raw, verify, self.where(key))


def aligned(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data is ``align``-byte aligned: TensorFlow then
    wraps a ``numpy_function`` result without copying it."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


# ============================================================================ batch loader
class BatchLoader:
    """One batch of records → one packed float32 array of channels-last, normalised,
    augmented fields (in a ``tf.numpy_function``), which :meth:`finish` slices into
    named tensors.

    Records are copied (and checked) into one staging buffer, then each output field is
    made in a single compiled pass (:func:`gather`: transpose, symmetry,
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
        self.shards = [ShardRecords(root, piece, manifest, self.readahead) for piece in plan.shards]
        self.rec_shard = np.concatenate(
            [np.full(len(s.indices), k, np.int32) for k, s in enumerate(self.shards)])
        self.rec_index = np.concatenate([s.indices for s in self.shards])
        self.slots = self.shards[0].layout.slots  # every shard's header matches the manifest
        self.record_size = self.shards[0].layout.record_size
        self.row = -(-self.record_size // 64) * 64  # staging rows stay 64-byte aligned
        self.grid = grid if norm.kind == "cbed" else None
        self.origin = grid_origin(probe_grid_origin)
        c, h, w = self.input_cf = tuple(fields[self.input].shape)
        self.map_hw = map_shape(manifest)
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
        self.tables = GatherTables(self.map_hw, self.input_cf, self.grid, self.origin)
        self._packing()

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
        if "tilt" in self.targets:
            out.append(("tilt", np.float32, (h, w, 3)))
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
        packed = aligned((B, self.packed_size), np.float32)
        arrays = {"packed": packed}
        for name, shape, start, stop in self.layout:
            arrays[name] = packed[:, start:stop].reshape((B,) + shape)
        for name, shape in self.extras:
            arrays[name] = aligned((B,) + shape, np.int64)
        return arrays

    # -- the per-batch call
    def __call__(self, ids, weights, epoch, batch):
        try:
            return self._load(np.asarray(ids), np.asarray(weights, np.float32).copy(), int(epoch), int(batch))
        except ShardError as error:
            raise ShardError(ERROR_MARK + str(error)) from None

    def _load(self, ids, weights, epoch, batch):
        B = len(ids)
        rng = np.random.default_rng([self.seed, epoch, self.rank, batch, 0xA06])
        elements = rng.integers(0, self.elements, size=B) if self.augment else np.zeros(B, np.int64)
        shard_of = self.rec_shard[ids]
        index_of = self.rec_index[ids]
        keys = [sample_key(k) for k in index_of.tolist()]
        stage = self._read(ids, weights, shard_of, keys)
        arrays = self._allocate(B)
        finite = self._assemble(stage, elements, arrays)
        for name, ok in finite.items():
            for i in np.nonzero(~ok)[0].tolist():
                message = (f"{self.shards[shard_of[i]].where(keys[i])}: "
                           f"non-finite values (NaN or Inf) in {name}")
                if not self.skip_corrupt:
                    raise ShardError(message)
                self._skip(arrays, i, weights, message, (self.shards[shard_of[i]].path, keys[i]))
        arrays["weight"][:] = weights
        if self.include_index:
            arrays["index"][:] = index_of
        if self.include_params:
            s = self.slots[PARAMS]
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
        stage = aligned((len(ids), self.row), np.uint8)
        size = self.record_size
        for k in np.unique(shard_of).tolist():
            shard = self.shards[k]
            with reading(shard.env, shard.path) as txn:
                for i in np.nonzero(shard_of == k)[0].tolist():
                    key = keys[i]
                    try:
                        raw = txn.get(key)
                        if raw is None:
                            raise ShardError(f"{shard.where(key)}: no such record")
                        verify = self.verify and (self.verified is None or not self.verified[ids[i]])
                        shard.layout.check(raw, verify, shard.where(key))
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

        t = self.tables
        src = self._field(stage, self.input)
        sub, mul, nonlinear = norm.input_terms(src if norm.method == "standardize" and norm.kind == "cbed" else None)
        chan = t.input_chan[elements]
        if sub.shape[0] > 1:  # per-sample terms follow the permuted channels
            sub, mul = np.take_along_axis(sub, chan, axis=1), np.take_along_axis(mul, chan, axis=1)
        elif sub.shape[1] > 1:  # per-channel terms
            sub, mul = sub[0][chan], mul[0][chan]
        run(self.input, arrays["inputs"], t.input_chan, t.input_pix, sub, mul, nonlinear)
        if "potential" in arrays:
            sub, mul = norm.target_terms("potential")
            run("potential", arrays["potential"], t.scalar_chan, t.map_pix, sub, mul)
        if "displacement" in arrays:
            _, mul = norm.target_terms("displacement")
            run("displacement", arrays["displacement"], t.disp_chan, t.map_pix, 0.0, t.disp_sign[elements] * mul)
            if self.has_columns:
                run("columns", arrays["displacement_mask"], t.mask_chan, t.map_pix, 0.0, 1.0)
            else:
                arrays["displacement_mask"][...] = 1.0
        if "tilt" in arrays:
            _, mul = norm.target_terms("tilt")
            run("tilt", arrays["tilt"], t.tilt_chan, t.map_pix, 0.0, t.tilt_sign[elements] * mul)
            arrays["tilt"][...] = tilt_target(arrays["tilt"])  # the head predicts magnitudes
        return finite

    def _skip(self, arrays, i, weights, message, ident):
        weights[i] = 0.0
        for name in ("inputs", "potential", "displacement", "displacement_mask", "tilt", "params"):
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
