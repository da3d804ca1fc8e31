"""Perovskite specimens: ideal sites, Glazer tilts, polar shifts, periodicity, [110] zone."""

import math
from itertools import product

import numpy as np
import pytest

from simulation.structures import (Material, build_specimen, draw_distortion, material_from_dict,
                                   measure_tilts, parse_glazer, rms_displacements)
from stemnet.errors import UserError

STO = Material("SrTiO3", "Sr", "Ti", "O", 3.905)
A = STO.a


def build(glazer="a0a0a0", tilt=(0.0, 0.0, 0.0), n=2, m=2, **kw):
    return build_specimen(STO, n, m, glazer=glazer, tilt_deg=tilt, **kw)


def mic(v, lengths):
    return v - np.round(v / lengths) * lengths


def sorted_rows(x, decimals=6):
    keys = np.round(x, decimals)
    return x[np.lexsort(keys.T[::-1])]


def x_bonds(spec):
    """Brute force: each X with its two B neighbours (ideal distance a/2, periodic)."""
    lengths = spec.atoms.cell.lengths()
    b = np.flatnonzero(spec.sublattice == 1)
    x = np.flatnonzero(spec.sublattice == 2)
    ideal = spec.ideal_positions
    dist = np.linalg.norm(mic(ideal[x][:, None] - ideal[b][None], lengths), axis=-1)
    near = np.argsort(dist, axis=1)[:, :2]
    half = np.take_along_axis(dist, near, axis=1)
    assert np.allclose(half[:, 0], half[:, 1]) and np.all(half <= A / 2 + 1e-9)
    assert np.all(np.sort(dist, axis=1)[:, 2] > 1.2 * half[:, 0])
    return x, b[near[:, 0]], b[near[:, 1]]


def test_ideal_sites_are_the_textbook_cubic_sites():
    n, m = 2, 3
    spec = build(n=n, m=m)
    basis = [((0, 0, 0), 0), ((.5, .5, .5), 1),
             ((.5, .5, 0), 2), ((.5, 0, .5), 2), ((0, .5, .5), 2)]
    rows = [(*(np.add(cell, frac) * A), sub)
            for cell in product(range(n), range(n), range(m)) for frac, sub in basis]
    expected = sorted_rows(np.array(rows))
    got = sorted_rows(np.column_stack([spec.atoms.positions, spec.sublattice]))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(spec.atoms.positions, spec.ideal_positions)
    np.testing.assert_array_equal(spec.atoms.cell.array, np.diag([n * A, n * A, m * A]))
    assert spec.atoms.pbc.all()
    assert spec.sublattice.dtype == np.int8 and spec.ideal_positions.dtype == np.float64
    symbols = np.array(spec.atoms.get_chemical_symbols())
    assert [set(symbols[spec.sublattice == k]) for k in range(3)] == [{"Sr"}, {"Ti"}, {"O"}]
    assert spec.params["glazer"] == "a0a0a0" and spec.params["n"] == n and spec.params["m"] == m


@pytest.mark.parametrize("glazer, tilt", [("a0a0a0", (0, 0, 0)), ("a0a0c-", (0, 0, 15)),
                                          ("a-a-a-", (15, 15, 15)), ("a+b-b-", (15, 10, 10))])
def test_each_site_once_and_no_close_atoms(glazer, tilt):
    n, m = 2, 2
    spec = build(glazer, tilt, n, m, polar_B_ang=(0.1, -0.1, 0.1))
    assert len(spec.atoms) == 5 * n * n * m
    assert np.bincount(spec.sublattice).tolist() == [n * n * m, n * n * m, 3 * n * n * m]
    pairs = np.triu_indices(len(spec.atoms), 1)
    assert spec.atoms.get_all_distances(mic=True)[pairs].min() > 1.5
    ideal = np.linalg.norm(mic(spec.ideal_positions[:, None] - spec.ideal_positions[None],
                               spec.atoms.cell.lengths()), axis=-1)[pairs]
    assert ideal.min() == pytest.approx(min(spec.params["lattice_ang"]) / 2)


TILT_CASES = [("a0a0c+", (0, 0, 1)), ("a0a0c-", (0, 0, 1)), ("a+b0b0", (1, 0, 0)),
              ("a0b-a0", (0, 1, 0)), ("a-a-a-", (1, 1, 1)), ("a+b-b-", (1, .6, .6))]


@pytest.mark.parametrize("glazer, scale", TILT_CASES)
@pytest.mark.parametrize("angle", [3.0, 12.0])
def test_tilt_measured_back_from_oxygen_positions(glazer, scale, angle):
    tilt = np.multiply(scale, angle)
    measured = measure_tilts(build(glazer, tilt))
    np.testing.assert_allclose(measured, tilt, atol=0.2)


def test_single_tilt_buckles_b_o_b_angle_by_twice_the_tilt():
    theta = 12.0
    spec = build("a0a0c-", (0, 0, theta))
    x, b1, b2 = x_bonds(spec)
    pos, lengths = spec.atoms.positions, spec.atoms.cell.lengths()
    v1, v2 = mic(pos[b1] - pos[x], lengths), mic(pos[b2] - pos[x], lengths)
    angle = np.degrees(np.arccos(np.sum(v1 * v2, 1) / np.linalg.norm(v1, axis=1)
                                 / np.linalg.norm(v2, axis=1)))
    along_z = np.abs(mic(spec.ideal_positions[b2] - spec.ideal_positions[b1], lengths)[:, 2]) > 1
    np.testing.assert_allclose(angle[along_z], 180.0, atol=1e-9)
    np.testing.assert_allclose(angle[~along_z], 180.0 - 2 * theta, atol=1e-9)


@pytest.mark.parametrize("glazer, tilt, axis, phase", [
    ("a0a0c+", (0, 0, 8), 2, 1), ("a0a0c-", (0, 0, 8), 2, -1),
    ("a+b0b0", (8, 0, 0), 0, 1), ("a-b0b0", (8, 0, 0), 0, -1)])
def test_in_phase_and_anti_phase_sign_patterns(glazer, tilt, axis, phase):
    """One cell along the tilt axis: X displacement ×(+1) for '+', ×(-1) for '-'.

    One cell across the tilt axis: ×(-1)."""
    spec = build(glazer, tilt, n=4, m=2)
    lattice = np.asarray(spec.params["lattice_ang"])
    grid = np.round(2 * spec.atoms.cell.lengths() / lattice).astype(int)
    on_x = spec.sublattice == 2
    keys = np.round(2 * spec.ideal_positions[on_x] / lattice).astype(int)
    disp = dict(zip(map(tuple, keys), spec.atoms.positions[on_x] - spec.ideal_positions[on_x]))
    moved = 0
    for key, d in disp.items():
        if np.linalg.norm(d) < 1e-9:
            continue
        moved += 1
        for step in range(3):
            neighbour = disp[tuple((np.array(key) + 2 * np.eye(3, dtype=int)[step]) % grid)]
            np.testing.assert_allclose(neighbour, (phase if step == axis else -1) * d, atol=1e-12)
    assert moved == 2 / 3 * len(disp)


@pytest.mark.parametrize("glazer, tilt", [("a0a0c+", (0, 0, 12)), ("a-b0b0", (12, 0, 0)),
                                          ("a-a-a-", (9, 9, 9)), ("a+b-b-", (9, 6, 6))])
def test_b_o_bond_lengths_of_rigid_octahedra(glazer, tilt):
    """The cell contracts (SPuDS): every B-O bond keeps a/2 (to 0.5 %, here exactly), the
    cell edge along b is a / sqrt(1 + sum of tan^2 of the other axes' tilts)."""
    spec = build(glazer, tilt, polar_B_ang=(0.0, 0.0, 0.0))
    x, b1, b2 = x_bonds(spec)
    pos, lengths = spec.atoms.positions, spec.atoms.cell.lengths()
    for b in (b1, b2):
        length = np.linalg.norm(mic(pos[b] - pos[x], lengths), axis=1)
        assert np.all(np.abs(length / (A / 2) - 1) < 0.005)
        np.testing.assert_allclose(length, A / 2, rtol=1e-12)
    tan2 = np.tan(np.radians(tilt)) ** 2
    np.testing.assert_allclose(lengths / 2, A / np.sqrt(1 + tan2.sum() - tan2), rtol=1e-12)
    if max(tilt) > 0:
        assert lengths.min() / 2 < 0.99 * A


@pytest.mark.parametrize("zone", ["001", "110"])
def test_octahedra_across_the_periodic_boundary_match_the_inside(zone):
    """Every BO6 is centrosymmetric, also where its bonds cross the cell boundary."""
    spec = build("a+b-b-", (10, 6, 6), zone=zone)
    lengths, pos = spec.atoms.cell.lengths(), spec.atoms.positions
    x, b1, b2 = x_bonds(spec)
    crossing = np.zeros(len(x), bool)
    checked = 0
    for b in np.flatnonzero(spec.sublattice == 1):
        rows = np.flatnonzero((b1 == b) | (b2 == b))
        assert len(rows) == 6
        to_x = mic(pos[x[rows]] - pos[b], lengths)
        ideal = mic(spec.ideal_positions[x[rows]] - spec.ideal_positions[b], lengths)
        raw = spec.ideal_positions[x[rows]] - spec.ideal_positions[b]
        crossing[rows] |= np.linalg.norm(raw, axis=1) > A / 2 + 1e-6
        for i, j in product(range(6), range(6)):
            if np.allclose(ideal[i], -ideal[j]):
                np.testing.assert_allclose(to_x[i], -to_x[j], atol=1e-12)
                checked += 1
    assert checked == 6 * np.count_nonzero(spec.sublattice == 1)
    assert crossing.any() and (~crossing).any()


def test_tiled_small_cell_equals_large_cell():
    kw = dict(glazer="a+b-b-", tilt=(10, 6, 6), polar_A_ang=(0.05, 0, -0.1))
    small = build(n=2, m=2, **kw).atoms.repeat((2, 2, 2))
    large = build(n=4, m=4, **kw).atoms
    np.testing.assert_allclose(sorted_rows(small.positions), sorted_rows(large.positions),
                               atol=1e-9)


def test_periodicity_rule_for_thickness():
    assert len(build("a0a0c+", (0, 0, 5), n=2, m=3).atoms) == 60   # in-phase about the beam
    for glazer, tilt in [("a0a0c-", (0, 0, 5)), ("a+b0b0", (5, 0, 0))]:
        with pytest.raises(ValueError, match="even m"):
            build(glazer, tilt, n=2, m=3)


def test_same_seed_same_specimen_and_different_seeds_differ():
    kw = dict(glazer_systems=["a0a0c+", "a-a-a-", "a+b-b-"], tilt_range_deg=(2.0, 12.0),
              polar_A_max_ang=0.1, polar_B_max_ang=0.2)

    def make(seed):
        return build(**{("tilt" if k == "tilt_deg" else k): v
                        for k, v in draw_distortion(np.random.default_rng(seed), **kw).items()})

    first, again, other = make(7), make(7), make(8)
    np.testing.assert_array_equal(first.atoms.positions, again.atoms.positions)
    assert first.params == again.params
    assert not np.allclose(first.atoms.positions, other.atoms.positions)


def test_draw_distortion_follows_glazer_letters_and_ranges():
    systems = ["a0a0c+", "a-a-a-", "a+b-b-", "a0b-b-"]
    rng = np.random.default_rng(0)
    draws = [draw_distortion(rng, glazer_systems=systems, tilt_range_deg=(3.0, 9.0),
                             polar_A_max_ang=0.1, polar_B_max_ang=0.3) for _ in range(400)]
    assert {d["glazer"] for d in draws} == set(systems)
    for d in draws:
        _, axes = parse_glazer(d["glazer"])
        for (letter, sign), angle in zip(axes, d["tilt_deg"]):
            assert angle == 0.0 if sign == "0" else 3.0 <= angle <= 9.0
        for letter in "abc":
            assert len({t for (l, _), t in zip(axes, d["tilt_deg"]) if l == letter}) <= 1
    norms_b = [np.linalg.norm(d["polar_B_ang"]) for d in draws]
    assert max(np.linalg.norm(d["polar_A_ang"]) for d in draws) <= 0.1
    assert 0.25 < max(norms_b) <= 0.3
    build(**{("tilt" if k == "tilt_deg" else k): v for k, v in draws[0].items()})


def test_polar_displacement_moves_a_and_b_by_exactly_the_vector():
    d_a, d_b = np.array([0.1, -0.05, 0.2]), np.array([-0.03, 0.12, 0.07])
    plain = build("a-a-a-", (8, 8, 8))
    polar = build("a-a-a-", (8, 8, 8), polar_A_ang=d_a, polar_B_ang=d_b)
    shift = polar.atoms.positions - polar.ideal_positions
    np.testing.assert_allclose(shift[polar.sublattice == 0], np.tile(d_a, (8, 1)), atol=1e-12)
    np.testing.assert_allclose(shift[polar.sublattice == 1], np.tile(d_b, (8, 1)), atol=1e-12)
    on_x = polar.sublattice == 2
    np.testing.assert_array_equal(polar.atoms.positions[on_x], plain.atoms.positions[on_x])
    np.testing.assert_allclose(measure_tilts(polar), measure_tilts(plain), atol=1e-9)
    assert polar.params["polar_B_ang"] == tuple(d_b)


def test_unicode_minus_is_accepted():
    assert parse_glazer("a−a−a−")[0] == "a-a-a-"
    np.testing.assert_array_equal(build("a−a−a−", (5, 5, 5)).atoms.positions,
                                  build("a-a-a-", (5, 5, 5)).atoms.positions)


@pytest.mark.parametrize("make, words", [
    (lambda: Material("bad", "Sr", "Qq", "O", 3.9), "'Qq'"),
    (lambda: Material("bad", "Sr", "Ti", "X", 3.9), "'X'"),
    (lambda: Material("bad", "Sr", "Ti", "O", -1.0), "positive"),
    (lambda: material_from_dict("bad", {"A": "Sr", "B": "Ti", "a": 3.9}), "missing keys ['X']"),
    (lambda: build("a0a0c+", (0, 0, 5), n=3), "even n"),
    (lambda: build("a-a-a-", (5, 5, 5), n=2, m=3), "even m"),
    (lambda: build("a0a0c+", (0, 0, 15.5)), "0 to 15"),
    (lambda: build("a0a0c+", (0, 0, -1)), "0 to 15"),
    (lambda: build("a-a-a-", (5, 5, 6)), "equal angles"),
    (lambda: build("a0a0c+", (2, 0, 5)), "no tilt about x"),
    (lambda: build("a0a0d+", (0, 0, 5)), "letter+sign"),
    (lambda: build(zone="111"), "zone"),
    (lambda: build(n=0), "n = 0"),
    (lambda: rms_displacements(STO, {"Sr": 0.08, "Ti": 0.06}), "'O'"),
])
def test_bad_input_is_a_one_line_value_error(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UserError)


def test_material_from_dict_and_rms():
    mat = material_from_dict("BTO", {"A": "Ba", "B": "Ti", "X": "O", "a": 4})
    assert mat == Material("BTO", "Ba", "Ti", "O", 4.0) and isinstance(mat.a, float)
    assert rms_displacements(mat, {"Ba": 0.08, "Ti": 0.06, "O": 0.1, "Sr": 1}) == \
        {"Ba": 0.08, "Ti": 0.06, "O": 0.1}


def test_zone_110_ideal_cell_and_columns():
    n, m = 2, 3
    spec = build(n=n, m=m, zone="[110]")
    assert len(spec.atoms) == 10 * n * n * m
    assert np.bincount(spec.sublattice).tolist() == [2 * n * n * m, 2 * n * n * m, 6 * n * n * m]
    cell = np.diag([n * A * math.sqrt(2), n * A, m * A * math.sqrt(2)])
    np.testing.assert_allclose(spec.atoms.cell.array, cell, atol=1e-12)
    # cation columns every a√2/2 along x (A and B alternate along y), O-only columns between
    for which, spacing in [(spec.sublattice < 2, A * math.sqrt(2) / 2),
                           (slice(None), A * math.sqrt(2) / 4)]:
        columns_x = np.unique(np.round(spec.ideal_positions[which, 0], 6))
        assert len(columns_x) == round(n * A * math.sqrt(2) / spacing)
        np.testing.assert_allclose(np.diff(columns_x), spacing, atol=1e-6)
    np.testing.assert_allclose(spec.ideal_positions[spec.sublattice == 1, 1] % A, A / 2, atol=1e-9)
    # back in the crystal frame: A on integer sites, B on all-half sites, O on face centres
    lab_axes = np.array([[-1, 1, 0], [0, 0, math.sqrt(2)], [1, 1, 0]]) / math.sqrt(2)
    half = 2 * spec.ideal_positions @ lab_axes / A
    np.testing.assert_allclose(half, np.round(half), atol=1e-9)
    odd = (np.round(half).astype(int) % 2).sum(axis=1)
    np.testing.assert_array_equal(odd, np.array([0, 3, 2])[spec.sublattice])
    pairs = np.triu_indices(len(spec.atoms), 1)
    assert spec.atoms.get_all_distances(mic=True)[pairs].min() == pytest.approx(A / 2)


@pytest.mark.parametrize("glazer, tilt", [("a-a-a-", (8, 8, 8)), ("a+b-b-", (10, 6, 6)),
                                          ("a0a0c+", (0, 0, 12))])
def test_zone_110_tilts_measured_back(glazer, tilt):
    spec = build(glazer, tilt, zone="110")
    np.testing.assert_allclose(measure_tilts(spec), tilt, atol=0.2)
    assert spec.atoms.get_all_distances(mic=True)[np.triu_indices(len(spec.atoms), 1)].min() > 1.5


@pytest.mark.parametrize("glazer, tilt", [("a0a0c+", (0, 0, 8)), ("a-a-a-", (6, 6, 6)), ("a+b-b-", (7, 5, 5))])
def test_tilt_sign_convention_is_counter_clockwise_about_each_positive_axis(glazer, tilt):
    """The octahedron of cell (0, 0, 0) turns counter-clockwise about +x, +y, +z (seen
    from the axis tip): its +x bond towards +y (about z), +y bond towards +z (about x),
    +z bond towards +x (about y) -- flipping every tilt's sign fails here."""
    spec = build(glazer, tilt, n=2, m=2)
    lattice = np.asarray(spec.params["lattice_ang"])
    b = np.flatnonzero(spec.sublattice == 1)
    b0 = b[np.argmin(np.linalg.norm(spec.ideal_positions[b] - lattice / 2, axis=1))]
    x = np.flatnonzero(spec.sublattice == 2)
    pos = spec.atoms.positions
    for axis, (bond, towards) in enumerate([(1, 2), (2, 0), (0, 1)]):  # about x, y, z
        site = spec.ideal_positions[b0] + lattice[bond] / 2 * np.eye(3)[bond]
        o = x[np.argmin(np.linalg.norm(spec.ideal_positions[x] - site, axis=1))]
        v = pos[o] - pos[b0]
        angle = math.degrees(math.atan2(v[towards], v[bond]))
        assert angle == pytest.approx(tilt[axis], abs=1e-9)
    np.testing.assert_allclose(spec.octahedron_tilt_deg[b0], tilt)
    np.testing.assert_allclose(measure_tilts(spec), tilt, atol=0.2)  # measured back from the atoms


@pytest.mark.parametrize("glazer, tilt", [("a0a0c+", (0, 0, 8)), ("a0a0c-", (0, 0, 8)), ("a-a-a-", (6, 6, 6)),
                                          ("a+b-b-", (7, 5, 5))])
def test_tilt_map_is_constant_over_each_cell_and_signed_per_octahedron(glazer, tilt):
    from simulation.imaging import pixel_positions
    from simulation.labels import tilt_map

    spec = build(glazer, tilt, n=2, m=2)
    lattice = np.asarray(spec.params["lattice_ang"])
    positions = pixel_positions((32, 32), 2 * lattice[0])  # 16 pixels per cell
    maps = tilt_map(spec, positions)
    assert maps.shape == (3, 32, 32)
    for i, j in product(range(2), range(2)):
        block = maps[:, 16 * j:16 * j + 16, 16 * i:16 * i + 16]  # rows along y (cell j), columns x (cell i)
        assert np.ptp(block, axis=(1, 2)).max() == 0  # one value per cell
        b = np.flatnonzero(spec.sublattice == 1)
        site = (np.array([i, j, 0]) + 0.5) * lattice
        b_site = b[np.argmin(np.linalg.norm(spec.ideal_positions[b] - site, axis=1))]  # entrance layer
        np.testing.assert_allclose(block[:, 0, 0], spec.octahedron_tilt_deg[b_site])
    np.testing.assert_allclose(np.abs(maps).max(axis=(1, 2)), tilt)
    if glazer == "a0a0c-":  # the column mean would be 0; the map keeps the entrance octahedron
        assert np.abs(maps[2]).min() == 8.0
