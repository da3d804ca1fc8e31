"""Module for finding and fitting atomic columns: the one peak finder of stemnet.

:func:`find_peaks` (scikit-image's ``peak_local_max``) is used everywhere a local
maximum is wanted (column finding here, the column-fit baseline of
:mod:`stemnet.evaluate`, the sample figures of :mod:`stemnet.stage`);
:func:`fit_gaussians` refines columns by 2-D Gaussian least squares
(``scipy.optimize.least_squares``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

#: Columns of :func:`fit_gaussians`' result.
FIT_FIELDS = ("y", "x", "sigma", "amplitude", "background")


def find_peaks(image: np.ndarray, min_distance_px: float = 1, threshold: Optional[float] = None, *,
               wrap: bool = False, exclude_border: bool = False) -> np.ndarray:
    """``(N, 2)`` integer (row, col) of local maxima of ``image`` above ``threshold``.

    Peaks are at least ``min_distance_px`` pixels apart (the brighter kept); ``wrap``
    treats the image as periodic (simulated label maps).

    >>> find_peaks(np.pad([[1.0]], 1), 1, 0.5).tolist()
    [[1, 1]]
    """
    from skimage.feature import peak_local_max

    image = np.asarray(image, np.float64)
    d = max(1, int(math.floor(min_distance_px)))
    if wrap:
        h, w = image.shape
        tiled = np.pad(image, d, mode="wrap")
        found = peak_local_max(tiled, min_distance=d, threshold_abs=threshold, exclude_border=False)
        found = found - d
        inside = (found[:, 0] >= 0) & (found[:, 0] < h) & (found[:, 1] >= 0) & (found[:, 1] < w)
        return found[inside]
    return peak_local_max(image, min_distance=d, threshold_abs=threshold,
                          exclude_border=d if exclude_border else False)


def _gaussian(params: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    y0, x0, sigma, amp, bg = params
    return bg + amp * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * sigma**2))


def fit_gaussians(image: np.ndarray, points: np.ndarray, radius_px: float, sigma_px: float) -> np.ndarray:
    """Refine columns by fitting ``bg + amp·exp(−r²/2σ²)`` in a disk of ``radius_px``.

    ``points``: ``(N, 2)`` (row, col) starting positions in pixels. Returns ``(N, 5)``
    (y, x, sigma, amplitude, background) in pixels and image units; a fit that fails or
    leaves the disk returns NaN for its row.
    """
    from scipy.optimize import least_squares

    image = np.asarray(image, np.float64)
    h, w = image.shape
    r = int(math.ceil(radius_px))
    out = np.full((len(points), len(FIT_FIELDS)), np.nan)
    for i, (py, px) in enumerate(np.asarray(points, np.float64)):
        cy, cx = int(round(py)), int(round(px))
        y0, y1, x0, x1 = max(0, cy - r), min(h, cy + r + 1), max(0, cx - r), min(w, cx + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        disk = (yy - py) ** 2 + (xx - px) ** 2 <= radius_px**2
        if disk.sum() < 6:
            continue
        values, yy, xx = image[y0:y1, x0:x1][disk], yy[disk], xx[disk]
        bg, top = float(values.min()), float(values.max())
        start = np.array([py, px, sigma_px, max(top - bg, 1e-12), bg])
        scale = max(top - bg, 1e-12)
        lower = [py - radius_px, px - radius_px, 0.2 * sigma_px, 0.0, bg - 2 * scale]
        upper = [py + radius_px, px + radius_px, 3.0 * sigma_px, 10 * scale, top + scale]
        try:
            fit = least_squares(lambda q: (_gaussian(q, yy, xx) - values) / scale, start,
                                bounds=(lower, upper), x_scale=[1, 1, sigma_px, scale, scale], max_nfev=60)
        except ValueError:
            continue
        if fit.success and np.hypot(fit.x[0] - py, fit.x[1] - px) < radius_px:
            out[i] = fit.x
    return out
