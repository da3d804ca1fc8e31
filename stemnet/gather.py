"""Channels-first records → channels-last, normalised, augmented batches in one pass.

The input pipeline's inner loop (:mod:`stemnet.data`). Every output is a gather:

    out[b, j, c] = g((src[b, chan[e, c], pix[e, j]] - sub[b, c]) * mul[b, c]),  e = elements[b]

with ``src`` a batch of one channels-first field flattened to ``(B, C_in, N)`` (``N = H·W``
pixels), ``out`` ``(B, N, C)`` (channels-last), ``pix[e]`` the source pixel of each
output pixel under symmetry ``e`` of the square, ``chan[e]`` the source channel of each
output channel (a permuted probe grid, swapped dx/dy, a mask channel repeated over its
sublattice's three components), ``sub``/``mul`` the normalisation (and vector signs) and
``g`` identity, ``sqrt(max(·, 0))`` or ``log1p(max(·, 0))``. The index tables are built by
applying :func:`stemnet.data.d4_array` to index grids, so the pipeline and the reference
transform cannot disagree. One compiled loop per field replaces a transpose, a
normalisation, an augmentation and a finiteness check; it releases the GIL, so
parallel batches run on separate cores.
"""

from __future__ import annotations

import numpy as np

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


def index_table(shape, elements, transform) -> np.ndarray:
    """``(E, prod(shape))`` int64: row ``e`` is ``transform(index grid, element e)``
    flattened, i.e. the source index of every output position."""
    grid = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return np.stack([np.ascontiguousarray(transform(grid, e)).reshape(-1) for e in elements])
