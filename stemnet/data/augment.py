"""Augmentation by the eight symmetries of the square, on samples and as gather tables.

Every real-space map is moved by the symmetry (:func:`stemnet.data.layout.d4_array`);
displacement vectors also turn (:func:`~stemnet.data.layout.d4_vectors`), and the tilt
angles turn as axial vectors (:func:`~stemnet.data.layout.tilt_vectors`: under a mirror
their in-plane components turn like a polar vector's times −1 and the tilt about z
changes sign, where a polar dz would not). For CBED, the
same transform permutes the probe grid (channels, ``[iy, ix]``) *and* is applied to
each diffraction pattern (``[ky, kx]``): a real-space rotation or mirror rotates or
mirrors reciprocal space identically. Maps and patterns are taken as sampled at pixel
centres (``(i + ½)·d``, as the label maps are); the probe grid's origin is
``probe_grid_origin``: ``"center"`` (probe ``i`` at ``(i + ½)·d``, as
:func:`simulation.multislice.probe_positions` scans; the default) makes a mirror map
probe ``i`` to ``n − 1 − i``; ``"corner"`` (probe ``i`` at ``i·d``) to ``(n − i) mod n``
(exact for a periodic field of view). Transposes need square grids; otherwise only
flips are drawn.

:func:`augment_sample` is the reference; :class:`GatherTables` holds the same transforms
as index tables (built by applying the same functions to index grids) for the
pipeline's compiled gather, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from stemnet.data.layout import (
    DISPLACEMENT_CHANNELS,
    ELEMENTS,
    SUBLATTICES,
    SWAP_XY,
    d4_array,
    d4_signs,
    d4_vectors,
    tilt_table,
    tilt_vectors,
)
from stemnet.errors import UserError

PROBE_GRID_ORIGINS = {"corner": 0.0, "center": 0.5}


def grid_origin(name: str) -> float:
    """The sampling offset (pixels) of a probe grid origin name."""
    if name not in PROBE_GRID_ORIGINS:
        raise UserError(f"probe_grid_origin {name!r}: expected 'corner' or 'center'")
    return PROBE_GRID_ORIGINS[name]


def augment_sample(sample: Dict[str, np.ndarray], element: Sequence[int], *,
                   grid: Optional[Tuple[int, int]] = None, probe_grid_origin: str = "center") -> Dict[str, np.ndarray]:
    """The channels-first sample seen through a symmetry (the reference implementation,
    numerically identical to what the pipeline does).

    ``grid = (gx, gy)`` marks ``cbed`` as a probe-grid stack.
    """
    origin = grid_origin(probe_grid_origin)
    out = {}
    for name, value in sample.items():
        value = np.asarray(value)
        if name == "displacement":
            out[name] = d4_vectors(d4_array(value, element), element, channel_axis=0)
        elif name == "tilt":
            out[name] = np.ascontiguousarray(np.moveaxis(tilt_vectors(np.moveaxis(d4_array(value, element), 0, -1),
                                                                      element), -1, 0))
        elif name == "cbed" and grid is not None:
            gx, gy = grid
            k1, k2 = value.shape[-2:]
            g = value.reshape(gy, gx, k1, k2)
            g = d4_array(g, element, axes=(0, 1), origin=origin)
            g = d4_array(g, element, axes=(2, 3))
            out[name] = np.ascontiguousarray(g).reshape(value.shape)
        elif value.ndim >= 2 and name != "params":
            out[name] = np.ascontiguousarray(d4_array(value, element))
        else:
            out[name] = value
    return out


def index_table(shape, transform) -> np.ndarray:
    """``(8, prod(shape))`` int64: row ``e`` is ``transform(index grid, ELEMENTS[e])``
    flattened, i.e. the source index of every output position."""
    grid = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    return np.stack([np.ascontiguousarray(transform(grid, e)).reshape(-1) for e in ELEMENTS])


class GatherTables:
    """Per symmetry element ``e`` (:data:`~stemnet.data.layout.ELEMENTS`): the source
    pixel of every output pixel and the source channel of every output channel.

    Parameters
    ----------
    map_hw : (H, W)
        The label-map grid.
    input_cf : (C, H, W)
        The input field's stored shape.
    grid : (gx, gy), optional
        The probe grid of a CBED input (its channels are permuted too).
    origin : float
        The probe grid's sampling offset (:func:`grid_origin`).
    """

    def __init__(self, map_hw, input_cf, grid=None, origin: float = 0.5):
        c = input_cf[0]
        self.map_pix = index_table(tuple(map_hw), d4_array)
        self.input_pix = index_table(tuple(input_cf[1:]), d4_array)
        if grid is not None:
            gx, gy = grid
            self.input_chan = index_table((gy, gx), lambda g, e: d4_array(g, e, origin=origin))
        else:
            self.input_chan = np.tile(np.arange(c), (len(ELEMENTS), 1))
        identity = np.arange(len(DISPLACEMENT_CHANNELS))
        self.disp_chan = np.stack([SWAP_XY if e[0] else identity for e in ELEMENTS])
        self.disp_sign = np.stack([d4_signs(e) for e in ELEMENTS])
        per_sublattice = len(DISPLACEMENT_CHANNELS) // len(SUBLATTICES)
        # the mask of each displacement channel is its sublattice's column map
        self.mask_chan = np.tile(np.repeat(np.arange(len(SUBLATTICES)), per_sublattice), (len(ELEMENTS), 1))
        self.scalar_chan = np.zeros((len(ELEMENTS), 1), np.int64)
        tilt = [tilt_table(e) for e in ELEMENTS]  # tilt angles: an axial vector
        self.tilt_chan = np.stack([chan for chan, _ in tilt])
        self.tilt_sign = np.stack([sign for _, sign in tilt])
