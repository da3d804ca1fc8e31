"""Image formation: Fourier interpolation of a Nyquist scan, source blur, scan errors, detector."""

import math

import numpy as np
import pytest

from simulation import imaging, stem
from simulation.structures import Material, build_specimen

CELL = (7.2, 6.4)


def lattice_image(positions, cell=CELL):
    """A band-limited periodic test image (a few lattice harmonics) at positions (H, W, 2)."""
    x, y = positions[..., 0] / cell[0], positions[..., 1] / cell[1]
    return (1.0 + 0.6 * np.cos(2 * np.pi * 2 * x + 0.4) + 0.3 * np.cos(2 * np.pi * 3 * y - 1.0)
            + 0.2 * np.cos(2 * np.pi * (3 * x + 2 * y) + 0.2))


def row_shifts_ang(image, cell_x, harmonic=2):
    """Offset s of each row's probe positions, from the phase of a row image of
    cos(2 pi harmonic (x + s) / cell_x + phase) sampled over one period."""
    phase = np.angle(np.fft.fft(image - image.mean(axis=1, keepdims=True), axis=1)[:, harmonic])
    return np.unwrap(phase - phase[0]) * cell_x / (2 * np.pi * harmonic)


def stripes(positions, cell=CELL):
    """A lattice of stripes along x, plus a y modulation that is constant along a row."""
    return (np.cos(2 * np.pi * 2 * positions[..., 0] / cell[0] + 0.4)
            + 0.3 * np.cos(2 * np.pi * 3 * positions[..., 1] / cell[1]))


@pytest.mark.parametrize("scan", [(14, 16), (13, 15)])  # even (Nyquist bin) and odd grids
def test_fourier_series_is_exact_for_a_band_limited_periodic_image(scan):
    samples = lattice_image(imaging.pixel_positions(scan, (CELL[0], CELL[1])))
    fine = imaging.pixel_positions((57, 61), (20.0, 15.0), origin_ang=(-3.1, 2.2))  # beyond the cell
    got = imaging.evaluate(imaging.spectrum(samples), CELL, fine)
    np.testing.assert_allclose(got, lattice_image(fine), atol=1e-12)
    # at the scan's own sample positions the series returns the samples
    np.testing.assert_allclose(imaging.evaluate(imaging.spectrum(samples), CELL,
                                                imaging.pixel_positions(scan, CELL)), samples, atol=1e-12)


def test_nyquist_step_is_lambda_over_four_alpha():
    wavelength = 0.025079  # Å at 200 keV
    assert imaging.nyquist_step_ang(200e3, 20.0) == pytest.approx(wavelength / (4 * 0.020), rel=1e-3)
    assert imaging.scan_shape((7.81, 7.81), 0.3135) == (25, 25)
    assert imaging.scan_shape((7.81, 3.905), 7.81 / 16) == (8, 16)  # an exact fit stays exact


def test_source_blur_widens_an_isolated_column_in_quadrature_and_keeps_intensity():
    cell, n, sigma0, fwhm = (16.0, 16.0), 128, 0.3, 0.5
    positions = imaging.pixel_positions((n, n), cell)
    r2 = np.sum((positions - 8.0) ** 2, axis=-1)
    column = np.exp(-0.5 * r2 / sigma0**2)
    blurred = imaging.evaluate(imaging.source_blur(imaging.spectrum(column), cell, fwhm), cell, positions)

    def variance(img):  # second moment along x about the centre, Å²
        return float(np.sum(img * (positions[..., 0] - 8.0) ** 2) / img.sum())

    assert blurred.sum() == pytest.approx(column.sum(), rel=1e-12)
    expected = sigma0**2 + (fwhm / (2 * math.sqrt(2 * math.log(2)))) ** 2
    assert variance(blurred) == pytest.approx(expected, rel=1e-6)
    variance_y = float(np.sum(blurred * (positions[..., 1] - 8.0) ** 2) / blurred.sum())
    assert variance_y == pytest.approx(expected, rel=1e-6)


def test_jitter_moves_rows_along_x_by_the_configured_rms():
    rng = np.random.default_rng(1)
    positions = imaging.pixel_positions((2000, 32), CELL)
    moved = imaging.jitter(positions, 0.12, rng)
    np.testing.assert_array_equal(moved[..., 1], positions[..., 1])
    coeffs = imaging.spectrum(stripes(imaging.pixel_positions((16, 16), CELL)))
    shifts = row_shifts_ang(imaging.evaluate(coeffs, CELL, moved), CELL[0])  # measured from the image
    expected = moved[:, 0, 0] - positions[:, 0, 0]
    np.testing.assert_allclose(shifts, expected - expected[0], atol=1e-9)
    assert np.std(shifts) == pytest.approx(0.12, rel=0.05)


def test_drift_shears_and_stretches_a_lattice_by_the_configured_amount():
    positions = imaging.pixel_positions((64, 72), CELL)
    drifted = imaging.drift(positions, 0.01, -0.004)
    lines = np.arange(64)
    np.testing.assert_allclose(drifted[:, 0, 1] - positions[:, 0, 1], 0.004 * lines)  # stretch along y
    coeffs = imaging.spectrum(stripes(imaging.pixel_positions((16, 16), CELL)))
    shifts = row_shifts_ang(imaging.evaluate(coeffs, CELL, drifted), CELL[0])
    # the probe lags the drifting specimen by 0.01 Å per line: the lattice appears sheared
    np.testing.assert_allclose(np.polyfit(lines, shifts, 1), [-0.01, 0.0], atol=1e-9)


def test_flyback_stretches_the_first_columns_only():
    positions = imaging.pixel_positions((4, 40), CELL)
    moved = imaging.flyback(positions, 0.3, 3.0)
    lag = positions[..., 0] - moved[..., 0]
    np.testing.assert_allclose(lag[:, 0], 0.3)
    np.testing.assert_allclose(lag[:, 3], 0.3 / math.e)
    assert np.all(lag[:, 25:] < 1e-3)


def test_noise_statistics_match_the_dose_read_noise_gain_and_offset():
    rng = np.random.default_rng(3)
    image = np.full((400, 500), 0.2)
    dose, area, read, gain, offset = 5e3, 0.04, 2.0, 1.5, 0.01
    electrons = dose * area  # 200 e per pixel: 40 e on this detector
    out = imaging.detect(image, dose_e_per_ang2=dose, pixel_area_ang2=area, read_noise_e=read, gain=gain,
                         offset_frac=offset, rng=rng)
    assert out.mean() == pytest.approx(gain * 0.2 + offset, rel=5e-3)
    expected_var = gain**2 * (0.2 * electrons + read**2) / electrons**2
    assert out.var() == pytest.approx(expected_var, rel=0.03)
    counts = (out - offset) / gain * electrons  # back to electrons: Poisson plus read noise
    assert abs(np.mean(counts) - 40.0) < 0.1
    # dose 0: no shot noise, only gain and offset
    np.testing.assert_allclose(imaging.detect(image, dose_e_per_ang2=0.0, pixel_area_ang2=area, gain=2.0,
                                              offset_frac=0.1, rng=rng), 0.5)


def test_focal_points_average_a_gaussian_focal_spread():
    offsets, weights = imaging.focal_points(40.0, 3)
    assert weights.sum() == pytest.approx(1.0)
    assert np.sum(weights * offsets**2) == pytest.approx(40.0**2)  # the spread's variance
    assert imaging.focal_points(0.0, 3)[0].tolist() == [0.0]


# ------------------------------------------------------------------------ with abTEM
STO = Material("SrTiO3", "Sr", "Ti", "O", 3.905)
DETECTORS = {"haadf": (60.0, 150.0), "abf": (10.0, 20.0)}
MULTISLICE = dict(energy_ev=200e3, convergence_mrad=20.0, sampling_ang=0.055, slice_thickness_ang=STO.a / 2)


def test_nyquist_scan_interpolated_equals_a_direct_fine_scan():
    """A scan at the Nyquist step, Fourier-interpolated, equals the fine scan (both from
    abTEM multislice); a scan at twice the step (aliased) does not."""
    from simulation import multislice

    spec = build_specimen(STO, 1, 2, polar_B_ang=(0.15, -0.1, 0.0))
    cell = tuple(np.diag(spec.atoms.cell.array)[:2])
    fine = imaging.pixel_positions((20, 20), cell)
    direct = multislice.stem_images(spec.atoms, shape=(20, 20), fov_ang=((0, 0), cell), detectors=DETECTORS,
                                    **MULTISLICE).astype(np.float64)
    nyquist = imaging.nyquist_step_ang(200e3, 20.0)
    for step, bound in ((nyquist, 2e-3), (2 * nyquist, None)):
        images = stem.record(spec.atoms, cell_ang=cell, positions_ang=fine, scan_step_ang=step,
                             detectors=DETECTORS, draws={}, **MULTISLICE)
        error = np.abs(images - direct).max(axis=(1, 2)) / direct.std(axis=(1, 2))
        if bound is None:
            assert error.max() > 0.05  # aliased: the Nyquist rule is not a formality
        else:
            assert error.max() < bound


def test_astigmatism_elongates_the_image_of_a_column_as_the_ctf_says():
    """An isolated light column imaged with two-fold astigmatism: the HAADF image's long
    axis is the long axis of abTEM's probe intensity for the same coefficients."""
    import abtem
    from ase import Atoms

    atoms = Atoms("C", positions=[(5.0, 5.0, 0.5)], cell=np.diag([10.0, 10.0, 1.0]), pbc=True)
    draws = dict(residual_defocus_ang=40.0, residual_cs_ang=0.0, astigmatism_ang=40.0, astigmatism_angle_deg=30.0,
                 coma_ang=0.0, coma_angle_deg=0.0)
    positions = imaging.pixel_positions((50, 50), (10.0, 10.0))
    kw = dict(energy_ev=200e3, convergence_mrad=20.0, sampling_ang=0.08, slice_thickness_ang=1.0)
    image = stem.record(atoms, cell_ang=(10.0, 10.0), positions_ang=positions, scan_step_ang=0.3,
                        detectors={"adf": (30.0, 100.0)}, draws=draws, **kw)[0]
    probe = abtem.Probe(semiangle_cutoff=20.0, energy=200e3, gpts=(128, 128), extent=10.0,
                        aberrations=stem.probe_aberrations(draws))
    intensity = np.abs(probe.build(scan=abtem.CustomScan(np.array([[5.0, 5.0]])), lazy=False).array[0]) ** 2  # abTEM axes [x, y]

    def long_axis_deg(img, xs, ys):
        img = np.where(img > 0.3 * img.max(), img - 0.3 * img.max(), 0.0)  # the core, not the tails
        w = img / img.sum()
        mx, my = np.sum(w * xs), np.sum(w * ys)
        cxx, cyy = np.sum(w * (xs - mx) ** 2), np.sum(w * (ys - my) ** 2)
        cxy = np.sum(w * (xs - mx) * (ys - my))
        return 0.5 * math.degrees(math.atan2(2 * cxy, cxx - cyy)), cxx, cyy

    grid = np.arange(128) * 10.0 / 128
    px, py = np.meshgrid(grid, grid, indexing="ij")
    probe_axis, *_ = long_axis_deg(intensity, px, py)
    image_axis, cxx, cyy = long_axis_deg(image, positions[..., 0], positions[..., 1])
    assert abs(((image_axis - probe_axis) + 90) % 180 - 90) < 5.0
    assert max(cxx, cyy) > 1.3 * min(cxx, cyy)  # elongated
    # the long axis turns with the astigmatism angle (a bug in degrees/radians would not)
    turned = dict(draws, astigmatism_angle_deg=120.0)
    image = stem.record(atoms, cell_ang=(10.0, 10.0), positions_ang=positions, scan_step_ang=0.3,
                        detectors={"adf": (30.0, 100.0)}, draws=turned, **kw)[0]
    turned_axis, *_ = long_axis_deg(image, positions[..., 0], positions[..., 1])
    assert abs(((turned_axis - image_axis - 90.0) + 90) % 180 - 90) < 5.0
