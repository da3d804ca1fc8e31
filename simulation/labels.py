"""Label maps on the real-space output grid: column displacements and column masks.

The projected potential label comes from the same abTEM potential as the measurement
(:func:`simulation.multislice.projected_potential`); this module turns the specimen's
atoms into per-column maps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from simulation.structures import Specimen
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
    # round ideal positions to the tolerance grid; fold x ≈ cell back onto 0
    keys = np.round(ideal_xy / tolerance_ang).astype(np.int64)
    keys = np.mod(keys, np.round(cell / tolerance_ang).astype(np.int64))
    table = np.column_stack([specimen.sublattice.astype(np.int64), keys])
    unique, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse, minlength=len(unique)).astype(np.float64)
    mean = np.stack([np.bincount(inverse, shift[:, c], len(unique)) for c in range(3)], axis=1)
    mean /= counts[:, None]
    # the exact ideal site of each column (its first atom's), not the rounded key
    return Columns(ideal_xy[first], unique[:, 0].astype(np.int8), mean)


def column_maps(
    columns: Columns,
    *,
    cell_ang: tuple[float, float],
    fov_ang: float,
    shape: tuple[int, int],
    sigma_ang: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw columns as Gaussians on an (H, W) grid covering [0, fov) × [0, fov) Å.

    Periodic images of the columns are included so that a column near the field-of-view
    edge is drawn whole. Pixel (i, j) samples the point (x, y) = ((j + ½)·fov/W,
    (i + ½)·fov/H): rows follow y, columns follow x.

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
