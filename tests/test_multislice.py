"""Physics and contract tests of simulation.multislice (abTEM 1.0.9 and 1.0.11).

Specimens are tiny SrTiO3 [001] supercells built here with ase; grids are coarse so that
the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import numpy as np
import pytest

abtem = pytest.importorskip("abtem")

from ase import Atoms  # noqa: E402
from abtem.parametrizations import LobatoParametrization  # noqa: E402

from simulation import multislice as ms  # noqa: E402

A = 3.905  # SrTiO3 lattice parameter, Å
E = 200e3  # eV
# h^2 / (2 pi m0 e): projected-potential integral of an atom per Å of f_e(0), V*Å^2
H2_2PI_M0_E = 6.62607015e-34**2 / (2 * np.pi * 9.1093837015e-31 * 1.602176634e-19) * 1e20


def srtio3(n: int, m: int) -> Atoms:
    """Cubic SrTiO3, n x n x m unit cells; SrO planes at z = 0, TiO2 planes at a/2."""
    unit = Atoms(
        "SrTiO3",
        scaled_positions=[
            (0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)
        ],
        cell=[A, A, A],
        pbc=True,
    )
    return unit.repeat((n, n, m))


def wavelength_ang(energy_ev: float) -> float:
    """Relativistic electron wavelength [Å]."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    p = np.sqrt(2 * m0 * e * energy_ev * (1 + e * energy_ev / (2 * m0 * c**2)))
    return h / p * 1e10


def point_fov(x: float, y: float, half: float = 0.05):
    """A field of view whose single (1 x 1) scan pixel is centred on (x, y)."""
    return ((x - half, y - half), (x + half, y + half))


# ----------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
def test_slice_count_is_rounded_thickness_over_slice(m):
    atoms = srtio3(1, m)
    potential = ms.build_potential(atoms, sampling_ang=0.4, slice_thickness_ang=A / 2)
    assert potential.num_slices == 2 * m
    assert np.allclose(potential.slice_thickness, A / 2)


def test_slice_count_rounds_instead_of_ceiling():
    # 2 cells = 7.81 Å at 2.5 Å: abTEM's own float slice_thickness would give ceil -> 4.
    potential = ms.build_potential(
        srtio3(1, 2), sampling_ang=0.4, slice_thickness_ang=2.5
    )
    assert potential.num_slices == 3 == ms.num_slices(2 * A, 2.5)
    assert np.isclose(sum(potential.slice_thickness), 2 * A)


def test_every_atomic_plane_gets_its_own_slice():
    m = 7
    potential = ms.build_potential(
        srtio3(2, m), sampling_ang=0.4, slice_thickness_ang=A / 2
    )
    sliced = potential.get_sliced_atoms()
    counts = [len(sliced.get_atoms_in_slices(i)) for i in range(potential.num_slices)]
    # 2 x 2 cells per plane: SrO plane = 8 atoms, TiO2 plane = 12 atoms, alternating
    assert counts == [8, 12] * m
    assert sum(counts) == 5 * 4 * m


def test_no_atom_lost_projected_potential_equals_sum_of_atoms():
    atoms = srtio3(2, 3)
    lobato = LobatoParametrization()
    expected = sum(
        H2_2PI_M0_E * float(lobato.scattering_factor(s)(np.array([0.0]))[0])
        for s in atoms.get_chemical_symbols()
    )  # ∫∫ V_z dx dy of every atom, V*Å^3
    totals = []
    for offset in (None, 0.0):  # default quarter-slice offset, and none
        potential = ms.build_potential(
            atoms, sampling_ang=0.1, slice_thickness_ang=A / 2, z_offset_ang=offset
        )
        (config,) = list(ms.configurations(potential))
        dx, dy = config.sampling
        totals.append(float(np.asarray(config.array, np.float64).sum() * dx * dy))
    assert totals[0] == pytest.approx(expected, rel=1e-3)
    assert totals[0] == pytest.approx(totals[1], rel=1e-5)


def test_atom_lost_at_top_edge_is_detected():
    # 11.715 Å in 7 slices: the summed slice edges end just below c, and abTEM 1.0.9
    # silently drops an atom lying between them and c.
    c = 3 * A
    top = (1.0, 1.0, np.nextafter(c, 0))
    atoms = Atoms("Sr", positions=[top], cell=[A, A, c], pbc=True)
    potential = abtem.Potential(atoms, gpts=16, slice_thickness=(c / 7,) * 7)
    if ms.ABTEM_MISSLICES:
        with pytest.raises(RuntimeError, match="lost 1 of 1 atoms"):
            ms.check_sliced(potential)
    else:  # abTEM >= 1.0.10 wraps it to the bottom itself (abTEM PR #273)
        ms.check_sliced(potential)
    # the default offset of build_potential wraps it back to the bottom instead
    shifted = ms.build_potential(atoms, sampling_ang=0.4, slice_thickness_ang=c / 7)
    ms.check_sliced(shifted)


def test_frozen_phonon_configurations_are_distinct_and_complete():
    atoms = srtio3(2, 1)
    static = ms.build_potential(atoms, sampling_ang=0.2, slice_thickness_ang=A / 2)
    (reference,) = list(ms.configurations(static))
    potential = ms.build_potential(
        atoms,
        sampling_ang=0.2,
        slice_thickness_ang=A / 2,
        phonon_rms_ang={"Sr": 0.1, "Ti": 0.08, "O": 0.1},
        num_phonon_configs=3,
        seed=7,
    )
    configs = [np.asarray(c.array) for c in ms.configurations(potential)]
    assert len(configs) == 3
    total = float(np.asarray(reference.array).sum())
    for c in configs:  # abTEM's eager build leaves configurations 1.. at zero
        assert c.sum() == pytest.approx(total, rel=1e-3)
    assert not np.allclose(configs[0], configs[1])
    assert not np.allclose(configs[1], configs[2])
    with pytest.raises(ValueError, match="Ti"):
        ms.build_potential(
            atoms,
            sampling_ang=0.2,
            slice_thickness_ang=A / 2,
            phonon_rms_ang={"Sr": 0.1, "O": 0.1},
        )


# -------------------------------------------------------------------------------- CBED


def test_bragg_disks_at_lambda_over_a():
    atoms = srtio3(4, 2)
    wavelength = wavelength_ang(E)
    pixel = wavelength / (4 * A) * 1e3  # native angular pixel of a 4a cell, mrad
    k = 21
    patterns = ms.cbed_stack(
        atoms,
        energy_ev=E,
        convergence_mrad=2.0,
        grid=(1, 1),
        fov_ang=point_fov(2 * A, 2 * A),
        k=k,
        max_angle_mrad=k * pixel / 2,
        sampling_ang=0.1,
        slice_thickness_ang=A / 2,
    )
    assert patterns.shape == (1, k, k) and patterns.dtype == np.float32
    pattern = patterns[0].astype(np.float64)
    angles = (np.arange(k) - k // 2) * pixel  # bin centres, mrad
    expected = wavelength / A * 1e3
    assert expected == pytest.approx(6.42, abs=0.01)
    c = k // 2
    for axis, sign in [(0, 1), (0, -1), (1, 1), (1, -1)]:
        offset = int(round(sign * expected / pixel))
        window = [slice(c - 2, c + 3), slice(c - 2, c + 3)]
        window[axis] = slice(c + offset - 2, c + offset + 3)
        disk = pattern[tuple(window)]
        along = disk.sum(axis=1 - axis)
        centroid = float(np.sum(along * angles[window[axis]]) / along.sum())
        assert abs(centroid - sign * expected) < pixel
        assert abs(np.argmax(along) + window[axis].start - c - offset) == 0
        # (100) is weak along [001] (f_Sr ~ f_Ti + f_O there) but far above the gaps
        gap = list(window)
        gap[axis] = slice(c + 2 * sign, c + 2 * sign + 1)
        assert disk.sum() > 1e4 * pattern[tuple(gap)].sum()


def test_thin_specimen_pattern_intensity_within_detector():
    patterns = ms.cbed_stack(
        srtio3(2, 1),
        energy_ev=E,
        convergence_mrad=20.0,
        grid=(2, 2),
        fov_ang=((0.0, 0.0), (A, A)),
        k=32,
        max_angle_mrad=60.0,
        sampling_ang=0.1,
        slice_thickness_ang=A / 2,
    )
    totals = patterns.sum(axis=(1, 2))
    assert np.all(totals > 0.9) and np.all(totals <= 1.0)


def test_friedel_symmetry_on_a_centrosymmetric_site():
    atoms = srtio3(2, 3)
    kwargs = dict(
        energy_ev=E,
        convergence_mrad=20.0,
        grid=(1, 1),
        k=31,
        max_angle_mrad=60.0,
        sampling_ang=0.1,
        slice_thickness_ang=A / 2,
    )
    on_sr = ms.cbed_stack(atoms, fov_ang=point_fov(A, A), **kwargs)[0]
    friedel = np.abs(on_sr - on_sr[::-1, ::-1]).max() / on_sr.max()
    assert friedel < 1e-3
    # the check has power: off a symmetry site the pattern is not centrosymmetric
    off = ms.cbed_stack(atoms, fov_ang=point_fov(A + 0.6, A + 0.3), **kwargs)[0]
    assert np.abs(off - off[::-1, ::-1]).max() / off.max() > 1e-2


@pytest.mark.parametrize("shift_ang", [(0.4, 0.0), (-0.4, 0.0), (0.0, 0.4)])
def test_specimen_shift_moves_the_pattern_centre_of_mass_towards_the_atom(shift_ang):
    """A probe beside an atom is deflected towards it (the momentum transfer is along
    the potential's gradient): an atom moved along +x from the probe puts the pattern's
    centre of mass at +kx (columns), along +y at +ky (rows). Transposed patterns fail."""
    atoms = Atoms("Sr", positions=[(6.0 + shift_ang[0], 6.0 + shift_ang[1], 1.0)], cell=[12.0, 12.0, 2.0],
                  pbc=True)
    pattern = ms.cbed_stack(atoms, energy_ev=E, convergence_mrad=20.0, grid=(1, 1), fov_ang=point_fov(6.0, 6.0),
                            k=31, max_angle_mrad=40.0, sampling_ang=0.08, slice_thickness_ang=2.0)[0]
    k = np.arange(31) - 15
    com = np.array([np.sum(pattern * k[None, :]), np.sum(pattern * k[:, None])]) / pattern.sum()  # (kx, ky)
    along = int(np.argmax(np.abs(shift_ang)))
    assert np.sign(com[along]) == np.sign(shift_ang[along])
    assert abs(com[along]) > 0.05 and abs(com[1 - along]) < 0.05 * abs(com[along])


CBED_KW = dict(
    energy_ev=E,
    convergence_mrad=20.0,
    grid=(3, 2),
    fov_ang=((0.0, 0.0), (A, A)),
    k=16,
    max_angle_mrad=50.0,
    sampling_ang=0.12,
    slice_thickness_ang=A / 2,
)


@pytest.fixture(scope="module")
def cbed_small():
    return ms.cbed_stack(srtio3(2, 2), **CBED_KW)


def test_cbed_raster_order_and_batching(cbed_small):
    atoms = srtio3(2, 2)
    assert cbed_small.shape == (6, 16, 16)
    positions = ms.probe_positions((3, 2), CBED_KW["fov_ang"])
    assert np.allclose(positions[1], (A / 2, A / 4))  # p = iy * gx + ix: x fastest
    assert np.allclose(positions[3], (A / 6, 3 * A / 4))
    one = {**CBED_KW, "grid": (1, 1), "fov_ang": point_fov(*positions[4])}
    single = ms.cbed_stack(atoms, **one)
    assert np.allclose(single[0], cbed_small[4], rtol=1e-4, atol=1e-7)
    batched = ms.cbed_stack(atoms, **CBED_KW, batch_positions=4)
    assert np.allclose(batched, cbed_small, rtol=1e-4, atol=1e-7)


def test_reference_implementations_agree(cbed_small):
    atoms = srtio3(2, 2)
    floor = ms.fft_floor_cbed(atoms, **CBED_KW)
    assert np.abs(floor - cbed_small).max() / cbed_small.max() < 1e-4
    naive_kw = {**CBED_KW, "grid": (1, 2), "fov_ang": ((0.0, 0.0), (A / 3, A))}
    naive = ms.naive_abtem_cbed(atoms, **naive_kw)
    assert np.abs(naive - cbed_small[[0, 3]]).max() / cbed_small.max() < 1e-4


def test_frozen_phonons_change_cbed_deterministically():
    atoms = srtio3(2, 2)
    kw = {**CBED_KW, "grid": (1, 1), "fov_ang": point_fov(A, A), "num_phonon_configs": 2}
    static = ms.cbed_stack(atoms, **{**kw, "num_phonon_configs": 1})
    a = ms.cbed_stack(atoms, **kw, phonon_rms_ang=0.1, seed=3)
    b = ms.cbed_stack(atoms, **kw, phonon_rms_ang=0.1, seed=3)
    c = ms.cbed_stack(atoms, **kw, phonon_rms_ang=0.1, seed=4)
    frozen = ms.cbed_stack(atoms, **kw, phonon_rms_ang=1e-6, seed=3)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() / a.max() > 1e-4
    assert np.abs(a - static).max() / static.max() > 1e-3
    assert np.abs(frozen - static).max() / static.max() < 1e-4
    assert a.sum() == pytest.approx(static.sum(), rel=0.05)


def test_cbed_bad_input_one_line_errors():
    atoms = srtio3(2, 1)
    too_large = r"k=200 larger than the pattern \(\d+ pixels within max_angle"
    with pytest.raises(ValueError, match=too_large) as err:
        ms.cbed_stack(atoms, **{**CBED_KW, "k": 200})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="fov_ang") as err:
        ms.cbed_stack(atoms, **{**CBED_KW, "fov_ang": ((0.0, 0.0), (3 * A, A))})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="max_angle_mrad=500"):
        ms.cbed_stack(atoms, **{**CBED_KW, "max_angle_mrad": 500.0})
    with pytest.raises(ValueError, match="energy_ev"):
        ms.cbed_stack(atoms, **{**CBED_KW, "energy_ev": 20e3})


# -------------------------------------------------------------------------------- STEM

STEM_KW = dict(
    energy_ev=E,
    convergence_mrad=20.0,
    shape=(3, 2),
    # pixel centres x in {a/2, a} (columns), y in {a/2, a, 3a/2} (rows):
    # [iy, ix] = [1, 1] Sr; [0, 0] and [2, 0] Ti-O; [0, 1], [1, 0] and [2, 1] O
    fov_ang=((A / 4, A / 4), (5 * A / 4, 7 * A / 4)),
    sampling_ang=0.06,
    slice_thickness_ang=A / 2,
    detectors={"bf": (0.0, 20.0), "abf": (10.0, 20.0), "haadf": (70.0, 130.0)},
    # aberrations matter for PRISM: abTEM < 1.0.11 mis-normalises aberrated S-matrix probes
    defocus_ang=15.0,
    cs_ang=2e4,
)


@pytest.fixture(scope="module")
def stem_pair():
    atoms = srtio3(2, 3)
    return (
        ms.stem_images(atoms, method="multislice", **STEM_KW),
        ms.stem_images(atoms, method="prism", **STEM_KW),
    )


def test_haadf_sr_columns_brighter_than_ti_o(stem_pair):
    images, _ = stem_pair
    assert images.shape == (3, 3, 2) and images.dtype == np.float32
    haadf = images[2]
    sr, tio, o = haadf[1, 1], haadf[[0, 2], [0, 0]], haadf[[0, 1, 2], [1, 0, 1]]
    assert sr > 1.5 * tio.max()
    assert tio.min() > o.max()
    assert np.allclose(tio, tio[0], rtol=1e-3) and np.allclose(o, o[0], rtol=1e-3)
    bf = images[0]
    assert np.all((bf > 0.5) & (bf < 1.0))


def test_prism_matches_multislice(stem_pair):
    multislice, prism = stem_pair
    for channel in range(3):
        diff = np.abs(prism[channel] - multislice[channel]).max()
        assert diff / np.abs(multislice[channel]).max() < 0.02


def test_stem_detector_beyond_band_limit_is_refused():
    with pytest.raises(ValueError, match="'haadf' outer angle 200 mrad beyond") as err:
        ms.stem_images(srtio3(2, 1), **{**STEM_KW, "detectors": None})
    assert "\n" not in str(err.value)
    assert ms.default_detectors(20.0) == {
        "bf": (0.0, 20.0), "abf": (10.0, 20.0), "haadf": (70.0, 200.0)
    }


# -------------------------------------------------------------------- labels and noise


def test_projected_potential_label():
    atoms = srtio3(2, 2)
    label = ms.projected_potential(
        atoms,
        shape=(3, 2),
        fov_ang=STEM_KW["fov_ang"],
        sampling_ang=0.1,
        slice_thickness_ang=A / 2,
    )
    assert label.shape == (1, 3, 2) and label.dtype == np.float32
    sr, tio, o = label[0, 1, 1], label[0, 2, 0], label[0, 2, 1]
    assert sr > tio > o > 0
    # on grid nodes the label is abTEM's own projection, in V*Å
    potential = ms.build_potential(atoms, sampling_ang=0.1, slice_thickness_ang=A / 2)
    projected = np.asarray(potential.project().array, np.float64)
    (nx, ny), (dx, dy) = projected.shape, potential.sampling
    fov = ((0.0, 0.0), (nx * dx, ny * dy))
    full = ms.projected_potential(
        atoms, shape=(ny, nx), fov_ang=fov, sampling_ang=0.1, slice_thickness_ang=A / 2
    )
    # pixel centres sit half a grid step off the nodes: compare with the node average
    nodes = 0.25 * (projected + np.roll(projected, -1, 0) + np.roll(projected, -1, 1)
                    + np.roll(np.roll(projected, -1, 0), -1, 1))
    assert np.corrcoef(full[0].T.ravel(), nodes.ravel())[0, 1] > 0.99
    assert full[0].sum() == pytest.approx(projected.sum(), rel=1e-3)


def test_poisson_noise():
    x = np.full((4, 64, 64), 0.25, np.float32)
    noisy = ms.add_poisson_noise(x, 1e4, 0.04, np.random.default_rng(0))  # 400 e- per pixel
    assert noisy.dtype == np.float32 and noisy.shape == x.shape
    assert noisy.mean() == pytest.approx(0.25, rel=0.01)
    assert noisy.var() == pytest.approx(0.25 / 400, rel=0.05)
    again = ms.add_poisson_noise(x, 1e4, 0.04, np.random.default_rng(0))
    assert np.array_equal(noisy, again)
    assert np.allclose(noisy * 400, np.round(noisy * 400), atol=1e-3)  # whole electrons
    with pytest.raises(ValueError, match="dose_e_per_ang2"):
        ms.add_poisson_noise(x, 0.0, 0.04, np.random.default_rng(0))


# ------------------------------------------------------------------ column-centred phonons


def _tagged_srtio3(n: int, m: int) -> Atoms:
    """srtio3 with its columns tagged as simulation.structures.build_specimen tags them."""
    from simulation.structures import column_tags

    atoms = srtio3(n, m)
    sublattice = np.array([{"Sr": 0, "Ti": 1, "O": 2}[s] for s in atoms.get_chemical_symbols()])
    atoms.set_tags(column_tags(atoms.positions, sublattice, np.diag(atoms.cell)))
    return atoms


def test_centred_phonons_keep_each_atom_rms_and_each_column_on_its_site():
    atoms = _tagged_srtio3(2, 6)
    tags = atoms.get_tags()
    # Sr, Ti and the apical O of the Ti columns, two equatorial O columns, per cell: 5 x 4 columns
    assert len(np.unique(tags)) == 20 and np.all(np.bincount(tags)[1:] == 6)
    fp = abtem.FrozenPhonons(atoms, 2, {"Sr": 0.08, "Ti": 0.06, "O": 0.09}, directions="xyz", seed=5)
    raw = [m.positions for m in fp.to_atoms_ensemble().trajectory]
    centred = [c.positions for c in ms.centred_configurations(fp, tags)]
    for r, c in zip(raw, centred):
        d_raw, d = r - atoms.positions, c - atoms.positions
        np.testing.assert_array_equal(d[:, 2], d_raw[:, 2])  # along the beam: abTEM's draw
        for tag in np.unique(tags):
            on = tags == tag
            np.testing.assert_allclose(d[on, :2].mean(axis=0), 0.0, atol=1e-12)
            expected = (d_raw[on, :2] - d_raw[on, :2].mean(axis=0)) * np.sqrt(6 / 5)
            np.testing.assert_allclose(d[on, :2], expected, atol=1e-12)
        # the raw draws put a 6-atom O column off its site by about 0.09/sqrt(6) = 3.7 pm
        o_cols = [np.linalg.norm(d_raw[tags == t, :2].mean(axis=0)) for t in np.unique(tags[atoms.numbers == 8])]
        assert np.sqrt(np.mean(np.square(o_cols))) > 0.015
    untagged = atoms.copy()
    untagged.set_tags(0)  # e.g. an amorphous layer: left as abTEM draws it
    kept = ms.centred_configurations(fp, untagged.get_tags())
    np.testing.assert_array_equal(kept[0].positions, raw[0])


def test_centred_phonons_leave_each_column_of_the_projected_potential_on_its_site():
    """The centroid of each O column of one configuration's projected potential lies on
    the static site with tags (column-centred), and off it without (abTEM's raw draws)."""
    atoms = _tagged_srtio3(2, 4)
    kw = dict(sampling_ang=0.05, slice_thickness_ang=A / 2,
              phonon_rms_ang={"Sr": 0.08, "Ti": 0.06, "O": 0.12}, num_phonon_configs=1, seed=11)
    plain = atoms.copy()
    plain.set_tags(0)

    def o_centroid_offsets(a):
        (config,) = ms.configurations(ms.build_potential(a, **kw))
        projected = np.asarray(config.array).sum(axis=0)  # (nx, ny): x first
        nx, ny = projected.shape
        px, py = 2 * A / nx, 2 * A / ny
        xs, ys = np.arange(nx) * px, np.arange(ny) * py  # abTEM samples at i·sampling
        out = []
        for site in {(round(x, 3), round(y, 3)) for x, y in np.mod(atoms.positions[atoms.numbers == 8, :2], 2 * A)}:
            if np.hypot(*(np.mod(np.array(site) / (A / 2), 2) - 1)) < 1e-3:
                continue  # the apical O on the Ti column
            dx = (xs - site[0] + A) % (2 * A) - A
            dy = (ys - site[1] + A) % (2 * A) - A
            w = projected * (np.hypot(dx[:, None], dy[None, :]) < 0.45)
            out.append([np.sum(w * dx[:, None]) / w.sum(), np.sum(w * dy[None, :]) / w.sum()])
        return np.linalg.norm(out, axis=1)

    centred, raw = o_centroid_offsets(atoms), o_centroid_offsets(plain)
    assert len(centred) == 8
    assert np.max(centred) < 0.012  # Å: what a 0.45 Å window makes of the neighbours' tails
    assert np.sqrt(np.mean(raw**2)) > 3 * np.sqrt(np.mean(centred**2))
