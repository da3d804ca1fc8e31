"""Module for the regression label: the projected potential sampled on the output grid."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase import Atoms
from scipy.ndimage import map_coordinates

from simulation.multislice.potential import build_potential, configurations
from simulation.multislice.probe import probe_positions
from simulation.multislice.settings import FovAng, abtem_settings, check_atoms, check_fov, check_grid


def projected_potential(
    atoms: Atoms,
    *,
    shape: Sequence[int],
    fov_ang: FovAng,
    sampling_ang: float,
    slice_thickness_ang: float,
    z_offset_ang: float | None = None,
    positions_ang: np.ndarray | None = None,
) -> np.ndarray:
    """Projected electrostatic potential on an output grid, the regression label.

    The static (no phonon) abTEM potential of :func:`build_potential` summed over all
    slices, then sampled at the pixel positions of :func:`probe_positions` by periodic
    cubic-spline interpolation.

    Parameters
    ----------
    atoms : ase.Atoms
        Specimen, orthogonal cell.
    shape : (int, int)
        Output size ``(H, W)``, rows along y, columns along x.
    fov_ang : ((x0, y0), (x1, y1))
        Field of view [Å] inside the cell.
    sampling_ang, slice_thickness_ang, z_offset_ang
        See :func:`build_potential`.
    positions_ang : (H, W, 2) float, optional
        Sample there instead [Å] (anywhere: the cell is periodic); ``fov_ang`` is then
        not used.

    Returns
    -------
    np.ndarray
        ``(1, H, W)`` float32 projected potential [V*Å].
    """
    atoms = check_atoms(atoms)
    shape = check_grid(shape, "shape")
    if positions_ang is None:
        fov = check_fov(fov_ang, np.diag(atoms.cell))
        positions_ang = probe_positions(shape[::-1], fov)
    with abtem_settings():
        potential = build_potential(
            atoms,
            sampling_ang=sampling_ang,
            slice_thickness_ang=slice_thickness_ang,
            z_offset_ang=z_offset_ang,
        )
        (config,) = list(configurations(potential))
        projected = np.asarray(config.array, dtype=np.float64).sum(axis=0)
    pixels = np.asarray(positions_ang, np.float64).reshape(-1, 2) / np.asarray(config.sampling)
    values = map_coordinates(projected, pixels.T, order=3, mode="grid-wrap")
    return values.reshape((1,) + shape).astype(np.float32)
