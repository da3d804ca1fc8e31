"""The metrics of `stemnet evaluate` against values worked out by hand on small arrays."""

import math

import numpy as np
import pytest

from stemnet.evaluate import column_fit, column_rmse, psnr, r2, ssim, tilt_about_beam


def test_r2_and_psnr_by_hand():
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    pred = np.array([0.0, 1.0, 2.0, 5.0])
    # SSE = 4, SST = 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert r2(truth, pred) == pytest.approx(1 - 4 / 5, abs=1e-12)
    # MSE = 1, peak = the truth's range 3
    assert psnr(truth, pred) == pytest.approx(10 * math.log10(9.0), abs=1e-12)
    assert r2(truth, truth) == 1.0 and psnr(truth, truth) == float("inf")


def test_ssim_of_one_window_by_hand():
    """3×3 maps are a single 3×3 window: SSIM is Wang et al.'s formula on their moments."""
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    # y = x + 1: means 4 and 5, variances and covariance all 60/9; L = 8
    c1, c2, var = (0.01 * 8) ** 2, (0.03 * 8) ** 2, 60 / 9
    expected = (2 * 4 * 5 + c1) * (2 * var + c2) / ((16 + 25 + c1) * (2 * var + c2))
    assert ssim(x, x + 1) == pytest.approx(expected, abs=1e-9)
    # two maps: the mean of their values; the data range stays the truth's over both
    assert ssim(np.concatenate([x, x]), np.concatenate([x + 1, x])) == pytest.approx((expected + 1) / 2, abs=1e-9)


def test_ssim_matches_scikit_image_and_a_hand_written_window_mean():
    from scipy.ndimage import uniform_filter
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    truth = rng.normal(size=(2, 9, 11, 1))
    pred = truth + rng.normal(scale=0.5, size=truth.shape)
    L = truth.max() - truth.min()
    reference = np.mean([structural_similarity(truth[i, ..., 0], pred[i, ..., 0], data_range=L, win_size=3,
                                               use_sample_covariance=False) for i in range(2)])
    # the same from the moments of every whole 3×3 window (population statistics)
    values = []
    for i in range(2):
        a, b = truth[i, ..., 0], pred[i, ..., 0]
        mu_a, mu_b = uniform_filter(a, 3), uniform_filter(b, 3)
        va = uniform_filter(a * a, 3) - mu_a**2
        vb = uniform_filter(b * b, 3) - mu_b**2
        cov = uniform_filter(a * b, 3) - mu_a * mu_b
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
        values.append(s[1:-1, 1:-1].mean())
    assert reference == pytest.approx(np.mean(values), abs=1e-9)
    assert ssim(truth, pred) == pytest.approx(reference, abs=1e-9)
    assert 0.2 < reference < 0.95


def test_column_rmse_by_hand():
    """Errors are read at column centres (mask >= 0.5) as (prediction - truth) / mask."""
    mask = np.full((1, 2, 3, 9), 0.2)  # 0.2: between columns, not scored
    mask[0, 0, 0, :] = 1.0
    mask[0, 1, 2, :] = 0.5
    d = np.linspace(-0.2, 0.3, 9)
    truth = d * mask
    err = np.zeros((1, 2, 3, 9))
    err[0, 0, 0, 0], err[0, 1, 2, 0] = 0.1, -0.3  # A dx, at the two centres (as displacements)
    err[0, 0, 1, 0] = 5.0  # off-column: ignored
    err[0, 0, 0, 7] = 0.04  # O dy at one centre, 0 at the other
    pred = truth + err * mask
    out = column_rmse(truth, pred, mask)
    assert out["A_dx"] == pytest.approx(math.sqrt((0.1**2 + 0.3**2) / 2), abs=1e-12)
    assert out["O_dy"] == pytest.approx(math.sqrt(0.04**2 / 2), abs=1e-12)
    assert out["B_dz"] == pytest.approx(0.0, abs=1e-12)
    assert len(out) == 9


def test_tilt_estimate_of_a_built_a0a0c_plus_8_degree_specimen():
    from simulation.labels import column_maps, find_columns
    from simulation.structures import Material, build_specimen

    sto = Material("SrTiO3", "Sr", "Ti", "O", 3.905)
    spec = build_specimen(sto, 4, 2, glazer="a0a0c+", tilt_deg=(0, 0, 8.0))
    disp, mask = column_maps(find_columns(spec), cell_ang=(4 * sto.a, 4 * sto.a), fov_ang=2 * sto.a,
                             shape=(32, 32), sigma_ang=0.35)
    disp = np.moveaxis(disp, 0, -1)[None]
    mask9 = np.repeat(np.moveaxis(mask, 0, -1), 3, axis=-1)[None]  # one mask channel per component
    tilt = tilt_about_beam(disp, mask9, np.array([sto.a]))
    assert tilt.shape == (1,) and tilt[0] == pytest.approx(8.0, abs=0.2)
    untilted = build_specimen(sto, 4, 2)
    disp0, _ = column_maps(find_columns(untilted), cell_ang=(4 * sto.a, 4 * sto.a), fov_ang=2 * sto.a,
                           shape=(32, 32), sigma_ang=0.35)
    assert tilt_about_beam(np.moveaxis(disp0, 0, -1)[None], mask9, np.array([sto.a]))[0] == 0.0


def _gaussians(shape, sites, sigma_px):
    """Periodic sum of unit Gaussians at (y, x) pixel sites."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    out = np.zeros(shape)
    for y, x in sites:
        for oy in (-h, 0, h):
            for ox in (-w, 0, w):
                out += np.exp(-((yy - y - oy) ** 2 + (xx - x - ox) ** 2) / (2 * sigma_px**2))
    return out


def test_column_fit_recovers_a_known_shift():
    """HAADF: A fixed, B shifted by (dy, dx) = (-0.25, +0.40) px; ABF: O dips shifted by
    (+0.20, -0.30) px; columns 2 px wide on 16 px cells. The fit returns those shifts."""
    cell, sigma = 16.0, 2.0
    a_sites = [(i * cell + 4, j * cell + 4) for i in range(3) for j in range(3)]
    b_sites = [(y + 8, x + 8) for y, x in a_sites]
    o_sites = [(y + 8, x) for y, x in a_sites] + [(y, x + 8) for y, x in a_sites]
    shape = (48, 48)
    mask = np.zeros((1, *shape, 9))
    for s, sites in enumerate([a_sites, b_sites, o_sites]):
        mask[0, ..., 3 * s:3 * s + 3] = _gaussians(shape, sites, sigma)[..., None]
    haadf = 2 * _gaussians(shape, a_sites, sigma) + _gaussians(shape, [(y - 0.25, x + 0.4) for y, x in b_sites], sigma)
    abf = 1 - 0.5 * _gaussians(shape, [(y + 0.2, x - 0.3) for y, x in o_sites], sigma)
    out = column_fit(np.stack([haadf, abf], -1)[None], ["HAADF", "ABF"], mask, radius_px=4.0)
    for s, sites, (dx, dy) in [(0, a_sites, (0, 0)), (1, b_sites, (0.4, -0.25)), (2, o_sites, (-0.3, 0.2))]:
        for y, x in sites[:3]:
            m = mask[0, int(y), int(x), 3 * s]
            assert out[0, int(y), int(x), 3 * s] / m == pytest.approx(dx, abs=0.02), (s, y, x)
            assert out[0, int(y), int(x), 3 * s + 1] / m == pytest.approx(dy, abs=0.02), (s, y, x)
