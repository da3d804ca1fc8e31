"""Module for bringing a micrograph to the run's sampling and intensity scale."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from stemnet.errors import UserError, argument

COARSER_LIMIT = 1.25  # largest accepted input pixel size / the run's pixel size
CLIP_PERCENTILES = (0.1, 99.9)
INTENSITY_RULES = ("match", "raw")


def check_sampling(pixel_size_ang: Tuple[float, float], training_ang: float, where: str = "input",
                   nyquist_ang: Optional[float] = None) -> None:
    """Refuse an image coarser than ``COARSER_LIMIT`` × the run's sampling ``training_ang`` [Å].

    Any finer image is accepted: it holds everything a coarser one does and is
    anti-alias downsampled (:func:`resample`). A coarser one would need structure the
    network never saw resolved.
    """
    hi = training_ang * COARSER_LIMIT
    for axis, value in zip("yx", pixel_size_ang):
        if value > hi:
            nyq = f", probe Nyquist step {nyquist_ang:.4g} Å" if nyquist_ang else ""
            raise UserError(f"{where}: pixel size {value:.4g} Å ({axis}) is coarser than this run can reconstruct: "
                            f"expected at most {hi:.4g} Å ({COARSER_LIMIT}× its sampling {training_ang:.4g} Å{nyq}); "
                            f"check the calibration or {argument('pixel_size')}")


def clip_outliers(data: np.ndarray, percentiles=CLIP_PERCENTILES) -> np.ndarray:
    """Each channel of ``(C, H, W)`` clipped to its [lo, hi] percentiles, taken as pixel values
    inside the range (``method="higher"`` / ``"lower"``), so that at least the single most
    extreme pixel at each end is clipped even in a small image."""
    out = np.empty_like(data, dtype=np.float64)
    for c in range(data.shape[0]):
        lo = np.percentile(data[c], percentiles[0], method="higher")
        hi = np.percentile(data[c], percentiles[1], method="lower")
        np.clip(data[c], lo, hi, out=out[c])
    return out


def resampled_shape(shape: Tuple[int, int], pixel_in: Tuple[float, float], pixel_out: float) -> Tuple[int, int]:
    """Pixels of the training-sampling grid that fit in the image: ``floor(extent / p)``
    (to within 1e-3 pixel: calibrations stored in single precision are not exact)."""
    return tuple(int(math.floor(n * q / pixel_out + 1e-3)) for n, q in zip(shape, pixel_in))


def band_limit(image: np.ndarray, pixel_ang: Tuple[float, float], cutoff_per_ang: float) -> np.ndarray:
    """``(H, W)`` image low-passed at spatial frequency ``cutoff_per_ang`` [1/Å] (an ideal
    circular filter on the mirror-extended image, so that its edges do not ring)."""
    h, w = image.shape
    mirrored = np.block([[image, image[:, ::-1]], [image[::-1], image[::-1, ::-1]]])
    fy = np.fft.fftfreq(2 * h, d=pixel_ang[0])[:, None]
    fx = np.fft.rfftfreq(2 * w, d=pixel_ang[1])[None, :]
    spectrum = np.fft.rfft2(mirrored)
    spectrum[fy ** 2 + fx ** 2 > cutoff_per_ang ** 2] = 0.0
    return np.fft.irfft2(spectrum, s=mirrored.shape)[:h, :w]


def resample(data: np.ndarray, pixel_in: Tuple[float, float], pixel_out: float,
             nyquist_ang: Optional[float] = None) -> np.ndarray:
    """``(C, H, W)`` images at pixel size ``pixel_in`` (y, x) [Å] → pixel size ``pixel_out`` [Å].

    Output pixel ``j`` samples ``(j + ½)·pixel_out`` from the image edge. When shrinking
    (any factor), everything above the signal's band is removed first: above the probe's
    transfer limit 1/(2·``nyquist_ang``) when the run records its Nyquist step (the image
    holds only noise there), else above the output's Nyquist frequency. The band-limited
    image is then sampled at the output pixels (cubic B-spline,
    ``scipy.ndimage.map_coordinates``) -- as the simulation samples its band-limited
    images at the training pixels, so a finer micrograph gives the training images again,
    aliasing included when the run was trained coarser than the probe's Nyquist step.
    """
    from scipy import ndimage

    shape = resampled_shape(data.shape[1:], pixel_in, pixel_out)
    if shape == tuple(data.shape[1:]) and np.allclose(pixel_in, pixel_out, rtol=1e-6, atol=0):
        return np.array(data, np.float64)
    coords = [(np.arange(n) + 0.5) * pixel_out / q - 0.5 for n, q in zip(shape, pixel_in)]
    grid = np.meshgrid(*coords, indexing="ij")
    cutoff = 1.0 / (2.0 * (nyquist_ang if nyquist_ang else pixel_out))
    shrink = pixel_out > min(pixel_in) * (1 + 1e-6)
    filtered = shrink and cutoff < 1.0 / (2.0 * max(pixel_in))
    out = np.empty((data.shape[0],) + shape, np.float64)
    for c in range(data.shape[0]):
        image = np.asarray(data[c], np.float64)
        if filtered:
            image = band_limit(image, pixel_in, cutoff)
        out[c] = ndimage.map_coordinates(image, grid, order=3, mode="reflect")
    return out


def match_intensity(data: np.ndarray, norm, rule: str = "match", where: str = "input") -> np.ndarray:
    """``(C, H, W)`` raw images → ``(H, W, C)`` float32 network inputs (module notes, step 6)."""
    if rule not in INTENSITY_RULES:
        raise UserError(f"intensity {rule!r}: expected one of {list(INTENSITY_RULES)}")
    x = np.moveaxis(np.asarray(data, np.float64), 0, -1).copy()
    if rule == "match":
        mean, std = np.asarray(norm.channel_mean, float), np.asarray(norm.channel_std, float)
        if len(mean) != x.shape[-1]:
            raise UserError(f"{where}: the run's normalisation has statistics for {len(mean)} channel(s), "
                            f"the input has {x.shape[-1]}")
        m = x.mean(axis=(0, 1))
        s = x.std(axis=(0, 1))
        if np.any(s <= 0):
            raise UserError(f"{where}: channel {int(np.argmin(s))} is constant; expected an image with contrast")
        x = mean + std * (x - m) / s
    return norm.inputs(x.astype(np.float32), channels_last=True)
