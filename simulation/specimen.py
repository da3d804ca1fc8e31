"""Specimen imperfections: an amorphous surface layer on the crystal.

(The crystal mistilt is the beam tilt of abTEM's probe, :func:`simulation.stem.record`;
thickness and frozen phonons are drawn by the generator and :mod:`simulation.multislice`.)
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

AVOGADRO = 6.02214076e23


def number_density_per_ang3(element: str, density_g_cm3: float) -> float:
    """Atoms per Å³ of an element at a mass density [g/cm³]."""
    mass = atomic_masses[atomic_numbers[element]]  # g/mol
    return density_g_cm3 * AVOGADRO / mass * 1e-24


def add_amorphous_layer(atoms: Atoms, thickness_ang: float, *, element: str = "C",
                        density_g_cm3: float = 2.0, slice_ang: float | None = None,
                        rng: np.random.Generator) -> tuple[Atoms, float]:
    """The crystal with an amorphous layer on its entrance surface (z < 0 before the shift).

    ``thickness_ang`` [Å] is rounded to whole slices of ``slice_ang`` (so the crystal's
    atomic planes keep their place between slice boundaries); the layer holds
    ``density · volume`` atoms of ``element`` at uniformly random positions (an ideal
    amorphous solid, no minimum distance). The crystal moves down by the layer thickness
    and the cell grows by it. Returns ``(atoms, thickness_ang used)``.
    """
    if thickness_ang <= 0:
        return atoms, 0.0
    if slice_ang:
        thickness_ang = slice_ang * max(1, round(thickness_ang / slice_ang))
    cell = np.array(atoms.cell.lengths())
    count = int(round(number_density_per_ang3(element, density_g_cm3) * cell[0] * cell[1] * thickness_ang))
    layer = rng.uniform(0.0, 1.0, size=(count, 3)) * (cell[0], cell[1], thickness_ang)
    out = atoms.copy()
    out.positions[:, 2] += thickness_ang
    out.set_cell(np.diag(cell + (0.0, 0.0, thickness_ang)))
    out.extend(Atoms(symbols=[element] * count, positions=layer))
    return out, float(thickness_ang)
