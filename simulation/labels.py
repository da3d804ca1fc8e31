"""Label maps on the real-space output grid: column displacements, column masks, tilt maps.

The projected potential label comes from the same abTEM potential as the measurement
(:func:`simulation.multislice.projected_potential`); this module turns the specimen's
atoms into per-column maps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from simulation.structures import Specimen, column_tags
from stemnet.data.layout import DISPLACEMENT_CHANNELS, SUBLATTICES  # noqa: F401 (re-exported)


class Columns(NamedTuple):
    """Atomic columns seen along the beam (z): one row per (sublattice, ideal x, y)."""

    xy: np.ndarray  # (C, 2) ideal column position, Å, inside the cell
    sublattice: np.ndarray  # (C,) 0 = A, 1 = B, 2 = O
    displacement: np.ndarray  # (C, 3) mean (dx, dy, dz) of the column's atoms, Å


def find_columns(specimen: Specimen, tolerance_ang: float = 0.05) -> Columns:
    """Group atoms into columns by sublattice and ideal (x, y); average their displacements."""
    cell = np.diag(specimen.atoms.cell.array)[:2]
    ideal_xy = np.mod(specimen.ideal_positions[:, :2], cell)
    shift = specimen.atoms.positions - specimen.ideal_positions
    inverse = column_tags(specimen.ideal_positions, specimen.sublattice, cell, tolerance_ang) - 1
    _, first = np.unique(inverse, return_index=True)
    counts = np.bincount(inverse).astype(np.float64)
    mean = np.stack([np.bincount(inverse, shift[:, c], len(first)) for c in range(3)], axis=1)
    mean /= counts[:, None]
    # the exact ideal site of each column (its first atom's), not the rounded key
    return Columns(ideal_xy[first], specimen.sublattice[first].astype(np.int8), mean)


def column_maps(
    columns: Columns,
    *,
    cell_ang: tuple[float, float],
    fov_ang: float,
    shape: tuple[int, int],
    sigma_ang: float,
    positions_ang: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw columns as Gaussians on an (H, W) grid covering [0, fov) × [0, fov) Å.

    Periodic images of the columns are included so that a column near the field-of-view
    edge is drawn whole. Pixel (i, j) samples the point (x, y) = ((j + ½)·fov/W,
    (i + ½)·fov/H): rows follow y, columns follow x. ``positions_ang`` ``(H, W, 2)``
    [Å] gives other points (a distorted scan: anywhere, the cell is periodic).

    Returns
    -------
    displacement : (9, H, W) float32
        Σ g_c · d_c per sublattice (A, B, O) and component (dx, dy, dz), Å: at a column
        centre the value equals the column's mean displacement (columns of one sublattice
        are ≥ a/2 apart, so their Gaussians do not overlap for σ ≲ a/8).
    mask : (3, H, W) float32
        Σ g_c per sublattice, 1 at column centres and ~0 between columns.
    """
    height, width = shape
    if positions_ang is not None:
        return _column_maps_at(columns, np.asarray(positions_ang, np.float64), cell_ang, sigma_ang)
    ys = (np.arange(height) + 0.5) * fov_ang / height
    xs = (np.arange(width) + 0.5) * fov_ang / width
    reach = 4.0 * sigma_ang
    displacement = np.zeros((9, height, width), np.float64)
    mask = np.zeros((3, height, width), np.float64)
    cx, cy = cell_ang
    for dx_img in (-cx, 0.0, cx):
        for dy_img in (-cy, 0.0, cy):
            xy = columns.xy + (dx_img, dy_img)
            inside = (
                (xy[:, 0] > -reach) & (xy[:, 0] < fov_ang + reach)
                & (xy[:, 1] > -reach) & (xy[:, 1] < fov_ang + reach)
            )
            for (x0, y0), sub, d in zip(xy[inside], columns.sublattice[inside], columns.displacement[inside]):
                gx = np.exp(-0.5 * ((xs - x0) / sigma_ang) ** 2)
                gy = np.exp(-0.5 * ((ys - y0) / sigma_ang) ** 2)
                g = np.outer(gy, gx)
                mask[sub] += g
                displacement[3 * sub : 3 * sub + 3] += d[:, None, None] * g
    return displacement.astype(np.float32), mask.astype(np.float32)


def _column_maps_at(columns: Columns, positions: np.ndarray, cell_ang, sigma_ang: float):
    """:func:`column_maps` at arbitrary points: each pixel sees the nearest periodic image
    of every column (minimum image; columns of one sublattice are far apart against σ)."""
    cell = np.asarray(cell_ang, np.float64)
    height, width = positions.shape[:2]
    displacement = np.zeros((9, height, width), np.float64)
    mask = np.zeros((3, height, width), np.float64)
    for (x0, y0), sub, d in zip(columns.xy, columns.sublattice, columns.displacement):
        offset = positions - (x0, y0)
        offset -= np.round(offset / cell) * cell
        g = np.exp(-0.5 * np.sum(offset**2, axis=-1) / sigma_ang**2)
        mask[sub] += g
        displacement[3 * sub : 3 * sub + 3] += d[:, None, None] * g
    return displacement.astype(np.float32), mask.astype(np.float32)


def tilt_map(specimen: Specimen, positions_ang: np.ndarray, tolerance_ang: float = 0.05) -> np.ndarray:
    """Per-cell octahedral tilt angles (deg, about crystal x, y, z) at ``positions_ang``
    ``(H, W, 2)`` [Å] → ``(3, H, W)`` float32, constant over each cell.

    A cell is the region nearest to a B column (periodic); its value is the signed tilt
    of the octahedron of that column's B atom nearest the entrance surface (smallest z):
    anti-phase tilts alternate along the beam, so a column mean would be 0. Signs:
    counter-clockwise about +axis, as :func:`simulation.structures.build_specimen`.
    """
    if specimen.octahedron_tilt_deg is None:
        raise ValueError("tilt_map: the specimen carries no octahedron tilts")
    cell = np.diag(specimen.atoms.cell.array)[:2]
    b_atoms = np.flatnonzero(specimen.sublattice == 1)
    ideal = specimen.ideal_positions[b_atoms]
    keys = np.mod(np.round(np.mod(ideal[:, :2], cell) / tolerance_ang).astype(np.int64),
                  np.round(cell / tolerance_ang).astype(np.int64))
    order = np.lexsort((ideal[:, 2], keys[:, 1], keys[:, 0]))  # per column, entrance atom first
    _, first = np.unique(keys[order], axis=0, return_index=True)
    top = b_atoms[order[first]]
    xy = np.mod(specimen.ideal_positions[top, :2], cell)
    offset = np.asarray(positions_ang, np.float64)[:, :, None, :] - xy
    offset -= np.round(offset / cell) * cell
    nearest = np.argmin(np.sum(offset**2, axis=-1), axis=-1)
    return np.moveaxis(specimen.octahedron_tilt_deg[top][nearest], -1, 0).astype(np.float32)
