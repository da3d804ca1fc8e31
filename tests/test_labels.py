"""Column label maps: values at column centres equal the specimen's column displacements."""

import numpy as np
import pytest

from simulation.labels import column_maps, find_columns
from simulation.structures import Material, build_specimen

STO = Material("SrTiO3", "Sr", "Ti", "O", 3.905)


def pixel(fov, shape, x, y):
    """Row/col of the pixel whose centre is nearest (x, y) Å."""
    h, w = shape
    return int(round(y / fov * h - 0.5)), int(round(x / fov * w - 0.5))


def test_columns_of_ideal_cell_have_zero_displacement():
    spec = build_specimen(STO, 2, 2)
    cols = find_columns(spec)
    # per unit cell in [001]: 1 A column, 1 B column, 3 O columns (one shared with B)
    assert np.bincount(cols.sublattice).tolist() == [4, 4, 12]
    assert np.abs(cols.displacement).max() == 0.0


def test_polar_and_tilt_displacements_appear_at_column_centres():
    spec = build_specimen(STO, 4, 2, glazer="a0a0c+", tilt_deg=(0, 0, 8.0),
                          polar_A_ang=(0.1, -0.05, 0.02), polar_B_ang=(0.0, 0.12, -0.03))
    a = float(spec.atoms.cell.array[0, 0]) / 4  # rigid octahedra: the cell contracts to a·cos 8°
    assert a == pytest.approx(STO.a * np.cos(np.radians(8.0)), rel=1e-9)
    cols = find_columns(spec)
    fov, shape = 2 * a, (78, 78)  # 0.1 Å pixels, columns on pixel centres
    disp, mask = column_maps(cols, cell_ang=(4 * a, 4 * a), fov_ang=fov, shape=shape, sigma_ang=0.3)
    assert disp.shape == (9, 78, 78) and mask.shape == (3, 78, 78)
    r, c = pixel(fov, shape, a, a)  # an A column (corner of the second cell)
    # near a column centre, map / mask is the column's displacement
    np.testing.assert_allclose(disp[0:3, r, c] / mask[0, r, c], [0.1, -0.05, 0.02], atol=1e-5)
    assert mask[0, r, c] > 0.95
    r, c = pixel(fov, shape, 0.5 * a, 0.5 * a)  # a B column
    np.testing.assert_allclose(disp[3:6, r, c] / mask[1, r, c], [0.0, 0.12, -0.03], atol=1e-5)
    # the O column at (a/2, 0): a c+ tilt of rigid octahedra moves it along x by
    # ±(a/2)·tan(8°) of the contracted cell, not along z
    r, c = pixel(fov, shape, 0.5 * a, a)
    expected = 0.5 * a * np.tan(np.radians(8.0))
    assert abs(disp[6, r, c] / mask[2, r, c]) == pytest.approx(expected, rel=1e-4)
    assert abs(disp[8, r, c]) < 1e-6
    # halfway between columns everything is ~0
    r, c = pixel(fov, shape, 0.25 * a, 0.25 * a)
    assert np.abs(disp[:, r, c]).max() < 1e-3 and mask[:, r, c].max() < 0.01


def test_edge_columns_are_drawn_whole_from_periodic_images():
    spec = build_specimen(STO, 2, 1, polar_A_ang=(0.05, 0.05, 0.0))
    cols = find_columns(spec)
    fov = 2 * STO.a  # == the cell: the A column at the origin is cut by every edge
    disp, mask = column_maps(cols, cell_ang=(fov, fov), fov_ang=fov, shape=(40, 40), sigma_ang=0.3)
    # symmetric about the origin: the first and last pixels see the same partial Gaussian
    assert mask[0, 0, 0] == pytest.approx(mask[0, -1, -1], rel=1e-5)
    assert mask[0, 0, 0] > 0.5
