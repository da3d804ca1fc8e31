"""Module for the shot noise of a finite electron dose."""

from __future__ import annotations

import numpy as np


def add_poisson_noise(
    x: np.ndarray,
    dose_e_per_ang2: float,
    pixel_area_ang2: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Shot noise for a given electron dose.

    Each probe position (scan pixel of area ``pixel_area_ang2``) receives
    ``N = dose_e_per_ang2 * pixel_area_ang2`` electrons. ``x`` holds fractions of the
    incident beam (the output of :func:`cbed_stack` or :func:`stem_images`), so the
    recorded counts are ``Poisson(N * x)``; they are returned divided by ``N``, on the
    scale of ``x`` (the noiseless limit is ``x``).

    Parameters
    ----------
    x : np.ndarray
        Non-negative noiseless intensities, fractions of the beam.
    dose_e_per_ang2 : float
        Electron dose [e/Å²].
    pixel_area_ang2 : float
        Area of one scan pixel [Å²], e.g. ``(fov_x / gx) * (fov_y / gy)``.
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    np.ndarray
        Noisy intensities, float32, shape of ``x``.
    """
    if dose_e_per_ang2 <= 0 or pixel_area_ang2 <= 0:
        raise ValueError(
            f"dose_e_per_ang2={dose_e_per_ang2} and pixel_area_ang2={pixel_area_ang2} "
            "must be > 0"
        )
    x = np.asarray(x, dtype=np.float64)
    if np.any(x < -1e-6):
        raise ValueError("x must be non-negative intensities")
    electrons = dose_e_per_ang2 * pixel_area_ang2
    counts = rng.poisson(np.clip(x, 0.0, None) * electrons)
    return (counts / electrons).astype(np.float32)
