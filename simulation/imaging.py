"""Image formation of a STEM scan: sampling, source size, focal spread, scan distortions, detector.

Array in, array out; units in every name. The chain a sample goes through
(:mod:`simulation.stem`):

1. the probe is scanned over the whole periodic cell at the probe's Nyquist step
   (:func:`nyquist_step_ang`) or finer, which samples the band-limited image exactly;
2. :func:`spectrum` takes its discrete Fourier series; :func:`source_blur` multiplies it by
   the Gaussian transfer of a finite source (partial spatial coherence);
3. :func:`evaluate` sums the Fourier series at any probe positions [Å] -- a finer pixel
   grid (:func:`pixel_positions`) moved by the scan distortions (:func:`jitter`,
   :func:`drift`, :func:`flyback`): exact trigonometric interpolation of the periodic image;
4. :func:`detect` adds shot noise for the dose, read noise, gain and offset.

The focal spread of a finite energy spread is an incoherent average of images over
defocus (:func:`focal_points` gives the Gauss-Hermite nodes and weights).

Positions are ``(..., 2)`` arrays of ``(x, y)`` [Å]; images are ``(H, W)`` with rows along y
and columns along x, the convention of :func:`simulation.multislice.probe_positions`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

__all__ = [
    "nyquist_step_ang",
    "scan_shape",
    "spectrum",
    "source_blur",
    "evaluate",
    "pixel_positions",
    "jitter",
    "drift",
    "flyback",
    "focal_points",
    "detect",
]


# ---------------------------------------------------------------------------- sampling
def nyquist_step_ang(energy_ev: float, convergence_mrad: float) -> float:
    """The probe's Nyquist step λ/(4α) [Å]: the image band limit is 2α/λ (abTEM's CTF)."""
    import abtem

    ctf = abtem.CTF(semiangle_cutoff=float(convergence_mrad), energy=float(energy_ev))
    return float(ctf.nyquist_sampling)


def scan_shape(cell_ang: Sequence[float], step_ang: float) -> tuple[int, int]:
    """``(ny, nx)`` probe positions covering the periodic cell ``(Lx, Ly)`` [Å] at a step
    no coarser than ``step_ang`` (a rounding margin of 1e-6 keeps an exact fit exact)."""
    lx, ly = (float(v) for v in cell_ang)
    return (max(1, math.ceil(ly / step_ang - 1e-6)), max(1, math.ceil(lx / step_ang - 1e-6)))


def spectrum(image: np.ndarray) -> np.ndarray:
    """Discrete Fourier coefficients ``c[ky, kx]`` (``fft2 / size``) of a periodic image
    sampled by an ``(ny, nx)`` scan over one cell (samples at the pixel centres
    ``x = (j + ½) Lx / nx``, see :func:`evaluate`)."""
    image = np.asarray(image, np.float64)
    return np.fft.fft2(image) / image.size


def _frequencies(n: int, length_ang: float) -> np.ndarray:
    return np.fft.fftfreq(n, 1.0 / n) / float(length_ang)  # 1/Å


def source_blur(coeffs: np.ndarray, cell_ang: Sequence[float], fwhm_ang: float) -> np.ndarray:
    """The image convolved with a Gaussian source of ``fwhm_ang`` [Å], in Fourier space:
    ``c · exp(-2π² σ² |k|²)`` with σ = FWHM / 2.355. Total intensity (k = 0) is kept."""
    if fwhm_ang <= 0:
        return coeffs
    sigma = fwhm_ang / FWHM_PER_SIGMA
    ky = _frequencies(coeffs.shape[0], cell_ang[1])
    kx = _frequencies(coeffs.shape[1], cell_ang[0])
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    return coeffs * np.exp(-2.0 * np.pi**2 * sigma**2 * k2)


def _split_nyquist(coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients along axis 0 and their signed frequencies (cycles per cell); on an
    even axis the Nyquist coefficient is split evenly between +n/2 and -n/2, which makes
    the interpolant real (the coefficient is ~0 for a scan at or below the Nyquist step)."""
    n = coeffs.shape[0]
    k = np.fft.fftfreq(n, 1.0 / n)
    if n % 2 or n == 1:
        return coeffs, k
    half = coeffs[n // 2 : n // 2 + 1] / 2
    coeffs = np.concatenate([coeffs[: n // 2], half, coeffs[n // 2 + 1 :], half])
    return coeffs, np.concatenate([k[: n // 2], [n / 2], k[n // 2 + 1 :], [-n / 2]])


def evaluate(coeffs: np.ndarray, cell_ang: Sequence[float], positions_ang: np.ndarray) -> np.ndarray:
    """The Fourier series of :func:`spectrum` summed at ``positions_ang`` ``(H, W, 2)`` [Å]
    (anywhere: the image is periodic), → ``(H, W)`` float64: exact trigonometric
    interpolation of the scan.

    The y coordinate must be constant along each row (true of every raster-scan error
    here: jitter and flyback move positions along x, drift moves a whole row), which makes
    the sum separable: one matrix product over ky per row, then one over kx per pixel.
    """
    positions_ang = np.asarray(positions_ang, np.float64)
    y = positions_ang[:, 0, 1]
    if not np.allclose(positions_ang[..., 1], y[:, None], atol=1e-9):
        raise ValueError("evaluate: expected positions with one y per row (a raster scan)")
    ny, nx = coeffs.shape
    lx, ly = (float(v) for v in cell_ang)
    coeffs, ky = _split_nyquist(coeffs)
    coeffs, kx = _split_nyquist(coeffs.T)
    coeffs = coeffs.T
    # sample j of the scan sits at (j + ½) L / n: shift the positions by that half step
    u = (positions_ang[..., 0] - 0.5 * lx / nx) / lx
    v = (y - 0.5 * ly / ny) / ly
    rows = np.exp(2j * np.pi * np.outer(v, ky)) @ coeffs  # (H, Kx)
    phases = np.exp(2j * np.pi * u[..., None] * kx)  # (H, W, Kx)
    return np.einsum("hwk,hk->hw", phases, rows).real


def pixel_positions(shape: Sequence[int], fov_ang: float | Sequence[float],
                    origin_ang: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Centres ``(H, W, 2)`` [Å] of an ``(H, W)`` pixel grid over ``fov_ang`` (x, y) from
    ``origin_ang``: pixel ``[i, j]`` at ``(x0 + (j + ½) fx/W, y0 + (i + ½) fy/H)``."""
    height, width = (int(v) for v in shape)
    fx, fy = np.broadcast_to(np.asarray(fov_ang, np.float64), (2,))
    xs = origin_ang[0] + (np.arange(width) + 0.5) * fx / width
    ys = origin_ang[1] + (np.arange(height) + 0.5) * fy / height
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx, yy], axis=-1)


# ------------------------------------------------------------------------ scan errors
def jitter(positions_ang: np.ndarray, rms_ang: float, rng: np.random.Generator) -> np.ndarray:
    """Line-to-line scan jitter: each row moved along the fast scan direction (x) by an
    independent Gaussian offset of ``rms_ang`` [Å] rms."""
    if rms_ang <= 0:
        return positions_ang
    out = np.array(positions_ang, np.float64)
    out[..., 0] += rng.normal(0.0, rms_ang, size=out.shape[0])[:, None]
    return out


def drift(positions_ang: np.ndarray, x_ang_per_line: float, y_ang_per_line: float) -> np.ndarray:
    """Linear specimen drift during a raster scan: row ``i`` is recorded ``i`` line times
    after row 0, when the specimen has moved by ``i · (dx, dy)`` [Å], so the probe lands at
    ``(x − i·dx, y − i·dy)`` of the specimen: a shear (dx) and a stretch (dy) of the image."""
    if x_ang_per_line == 0 and y_ang_per_line == 0:
        return positions_ang
    out = np.array(positions_ang, np.float64)
    lines = np.arange(out.shape[0], dtype=np.float64)[:, None]
    out[..., 0] -= lines * x_ang_per_line
    out[..., 1] -= lines * y_ang_per_line
    return out


def flyback(positions_ang: np.ndarray, amplitude_ang: float, decay_px: float) -> np.ndarray:
    """Flyback distortion: after the fast return the beam lags, so column ``j`` of every
    row lands at ``x − A·exp(−j / decay_px)`` [Å] (the first columns are stretched)."""
    if amplitude_ang == 0 or decay_px <= 0:
        return positions_ang
    out = np.array(positions_ang, np.float64)
    out[..., 0] -= amplitude_ang * np.exp(-np.arange(out.shape[1]) / decay_px)[None, :]
    return out


# ---------------------------------------------------------------- coherence, detector
def focal_points(spread_ang: float, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Defocus offsets [Å] and weights of a Gaussian focal spread of 1σ ``spread_ang``
    (the chromatic spread Cc·ΔE/E), by Gauss-Hermite quadrature with ``points`` nodes:
    the incoherent average ``Σ w_i I(Δf + δ_i)`` of images at those defoci."""
    if spread_ang <= 0 or points <= 1:
        return np.zeros(1), np.ones(1)
    nodes, weights = np.polynomial.hermite.hermgauss(int(points))
    return math.sqrt(2.0) * spread_ang * nodes, weights / math.sqrt(math.pi)


def detect(image_frac: np.ndarray, *, dose_e_per_ang2: float, pixel_area_ang2: float,
           read_noise_e: float = 0.0, gain: float = 1.0, offset_frac: float = 0.0,
           rng: np.random.Generator) -> np.ndarray:
    """The recorded image of a detector seeing ``image_frac`` (fractions of the beam).

    Each pixel gets ``N = dose · pixel area`` electrons: counts ``Poisson(N · image)``
    (no shot noise when the dose is 0), plus Gaussian read noise of ``read_noise_e``
    electrons rms, then ``gain · counts / N + offset_frac``. At ``gain`` 1 and offset 0
    the noiseless limit is ``image_frac``.
    """
    image = np.clip(np.asarray(image_frac, np.float64), 0.0, None)
    if dose_e_per_ang2 > 0:
        electrons = dose_e_per_ang2 * pixel_area_ang2
        counts = rng.poisson(image * electrons).astype(np.float64)
        if read_noise_e > 0:
            counts += rng.normal(0.0, read_noise_e, size=counts.shape)
        image = counts / electrons
    return gain * image + offset_frac
