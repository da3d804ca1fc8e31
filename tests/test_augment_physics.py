"""Augmentation respects physics: rotating/mirroring the specimen before simulating gives
what the pipeline's symmetry transform makes of the unrotated simulation."""

import numpy as np
import pytest
from ase import Atoms

from simulation.generator import draw_specimen, measure
from simulation.structures import Specimen
from stemnet.data import augment_sample

# element (transpose, flip_y, flip_x) -> where a point (x, y) of the field of view goes
MOVES = {
    (1, 1, 0): lambda x, y, L: (y, L - x),  # np.rot90 of [y, x] arrays
    (0, 0, 1): lambda x, y, L: (L - x, y),  # mirror x
    (1, 0, 0): lambda x, y, L: (y, x),      # transpose (mirror on the diagonal)
}


def transformed(specimen: Specimen, element, fov: float) -> Specimen:
    cell = np.diag(specimen.atoms.cell.array)

    def move(positions):
        x, y = MOVES[element](positions[:, 0], positions[:, 1], fov)
        out = np.column_stack([x, y, positions[:, 2]])
        out[:, :2] = np.mod(out[:, :2], cell[:2])
        return out

    atoms = Atoms(symbols=specimen.atoms.get_chemical_symbols(), positions=move(specimen.atoms.positions),
                  cell=specimen.atoms.cell, pbc=True)
    ideal = move(specimen.ideal_positions)
    # keep displacements exact (an atom and its ideal site may wrap on different sides)
    shift = specimen.atoms.positions - specimen.ideal_positions
    sx, sy = MOVES[element](shift[:, 0], shift[:, 1], 0.0)
    atoms.positions = ideal + np.column_stack([sx, sy, shift[:, 2]])
    return Specimen(atoms=atoms, ideal_positions=ideal, sublattice=specimen.sublattice, params=specimen.params)


@pytest.mark.parametrize("element", sorted(MOVES))
def test_symmetry_before_simulation_equals_after(tiny_config, element):
    cfg = tiny_config.model_copy(update={"output_shape": (16, 16)})
    specimen, rng = draw_specimen(cfg, 2)
    # rigid octahedra contract the cell with the tilt: a field of view of exactly half the
    # periodic supercell keeps the mirrored probe and potential grids on the same points
    cfg = cfg.model_copy(update={"fov_ang": float(specimen.atoms.cell.array[0, 0]) / 2})
    state = rng.bit_generator.state
    original = measure(cfg, specimen, rng)
    rng.bit_generator.state = state
    moved = measure(cfg, transformed(specimen, element, cfg.fov_ang), rng)
    expected = augment_sample(original, element, grid=tuple(cfg.cbed.grid))
    # labels: exact up to float rounding
    np.testing.assert_allclose(moved["displacement"], expected["displacement"], atol=1e-5)
    np.testing.assert_allclose(moved["columns"], expected["columns"], atol=1e-5)
    # the measurement and the potential: the same physics on a symmetric grid
    scale = np.abs(original["cbed"]).max()
    np.testing.assert_allclose(moved["cbed"], expected["cbed"], atol=2e-3 * scale)
    np.testing.assert_allclose(moved["potential"], expected["potential"], rtol=2e-3,
                               atol=2e-3 * np.abs(original["potential"]).max())
    # and the transform is not the identity on this sample
    assert np.abs(expected["displacement"] - original["displacement"]).max() > 1e-3
