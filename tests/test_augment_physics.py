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


def _rotation_deg(specimen: Specimen, b_atom: int) -> np.ndarray:
    """The rotation (deg, about x, y, z) of B atom ``b_atom``'s octahedron, measured from the
    atoms: the best rigid rotation (Kabsch) of its six ideal B→O vectors onto the actual
    ones (minimum image), as its axial vector (R32 − R23, R13 − R31, R21 − R12)/2 → asin."""
    cell = np.diag(specimen.atoms.cell.array)

    def mic(v):
        return v - np.round(v / cell) * cell

    o = np.flatnonzero(specimen.sublattice == 2)
    r0 = mic(specimen.ideal_positions[o] - specimen.ideal_positions[b_atom])
    near = np.argsort(np.linalg.norm(r0, axis=1))[:6]
    r0 = r0[near]
    r = mic(specimen.atoms.positions[o[near]] - specimen.atoms.positions[b_atom])
    u, _, vt = np.linalg.svd(r0.T @ r)
    rot = (u @ vt).T  # r ≈ rot @ r0
    w = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / 2
    return np.degrees(np.arcsin(w))


def _moved(specimen: Specimen, element, fov: float) -> Specimen:
    """The specimen seen through ``element`` (transpose, then mirror y, then mirror x) as a
    3-D mirror or rotation of the atoms about the beam; z unchanged."""
    t, fy, fx = element

    def move(p, length):
        x, y = (p[:, 1], p[:, 0]) if t else (p[:, 0], p[:, 1])
        y = length - y if fy else y
        x = length - x if fx else x
        return np.column_stack([x, y, p[:, 2]])

    ideal = move(specimen.ideal_positions, fov)
    shift = move(specimen.atoms.positions - specimen.ideal_positions, 0.0)  # a polar vector: -x, -y at length 0
    atoms = Atoms(symbols=specimen.atoms.get_chemical_symbols(), positions=ideal + shift, cell=specimen.atoms.cell,
                  pbc=True)
    return Specimen(atoms=atoms, ideal_positions=ideal, sublattice=specimen.sublattice, params=specimen.params)


@pytest.mark.parametrize("glazer,tilt", [("a-a-a-", (6.0, 6.0, 6.0)), ("a-a-c0", (7.0, 7.0, 0.0))])
def test_tilt_labels_follow_the_mirrored_atoms_as_an_axial_vector(glazer, tilt):
    """Mirror or rotate the 3-D specimen about the beam, measure each octahedron's rotation
    from the moved atoms: it equals what augment_sample makes of the tilt label map (a
    polar-vector transform of the angles would be wrong by twice an angle under every mirror)."""
    from simulation.labels import tilt_map
    from simulation.imaging import pixel_positions
    from simulation.structures import build_specimen, material_from_dict
    from stemnet.data.layout import ELEMENTS

    sto = material_from_dict("SrTiO3", {"A": "Sr", "B": "Ti", "X": "O", "a": 3.905})
    spec = build_specimen(sto, 4, 2, glazer=glazer, tilt_deg=tilt)
    fov, n = float(spec.atoms.cell[0, 0]), 32
    labels = tilt_map(spec, pixel_positions((n, n), fov))
    b = np.flatnonzero((spec.sublattice == 1) & (spec.ideal_positions[:, 2] < spec.atoms.cell[2, 2] / 4))
    for atom in b:  # the measurement agrees with the label before any symmetry
        x, y = np.mod(spec.ideal_positions[atom, :2], fov)
        np.testing.assert_allclose(_rotation_deg(spec, atom), labels[:, int(y / fov * n), int(x / fov * n)],
                                   atol=0.35)
    for element in ELEMENTS:
        moved = _moved(spec, element, fov)
        seen = augment_sample({"tilt": labels}, element)["tilt"]
        d = np.zeros((9, n, n), np.float32)
        d[3:6] = labels  # the angles as if they were a polar vector (dx, dy, dz)
        polar = augment_sample({"displacement": d}, element)["displacement"][3:6]
        for atom in b:
            x, y = np.mod(moved.ideal_positions[atom, :2], fov)
            pixel = (slice(None), int(y / fov * n) % n, int(x / fov * n) % n)
            measured = _rotation_deg(moved, atom)
            np.testing.assert_allclose(measured, seen[pixel], atol=0.35, err_msg=str(element))
            if sum(element) % 2:  # a mirror: a polar transform gets the signs wrong
                assert np.abs(measured - polar[pixel]).max() > 5.0, element

