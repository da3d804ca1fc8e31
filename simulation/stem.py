"""STEM images as an instrument records them: the probe scanned at its Nyquist step over the
periodic cell, the images interpolated onto the (distorted) scan positions, with the
imperfections of a real microscope drawn per sample.

One sample goes: :func:`check_sampling` (once per dataset) → :func:`draw_imperfections` →
:func:`scan_positions` → :func:`record` (multislice per focal point, source blur,
interpolation; noiseless) → :func:`simulation.imaging.detect` (dose, read noise, gain).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from simulation import imaging
from stemnet.errors import UserError

#: Names of the drawn imperfections, in drawing order (units in the names), as in params.
IMPERFECTION_PARAMS = (
    "source_fwhm_ang", "residual_defocus_ang", "astigmatism_ang", "astigmatism_angle_deg", "coma_ang",
    "coma_angle_deg", "residual_cs_ang", "focal_spread_ang", "mistilt_mrad", "mistilt_angle_deg",
    "amorphous_ang", "jitter_ang", "drift_x_ang_per_line", "drift_y_ang_per_line", "flyback_ang",
    "dose_e_per_ang2", "read_noise_e", "gain", "offset_frac",
)
CONFIG_KEYS = {  # param name -> ImperfectionsConfig field, where they differ
   "residual_defocus_ang": "defocus_ang", "residual_cs_ang": "cs_ang"}
_ANGLES_DEG = {"astigmatism_angle_deg": ("astigmatism_ang", 180.0), "coma_angle_deg": ("coma_ang", 360.0),
               "mistilt_angle_deg": ("mistilt_mrad", 360.0)}


def check_sampling(cfg) -> dict:
    """The sampling of a STEM dataset: ``pixel_size_ang`` of images and label maps,
    ``nyquist_step_ang`` of the probe, ``scan_step_ang`` (at most the Nyquist step) and
    ``undersampled`` -- or a one-line error if the scan step or the pixel is coarser than
    Nyquist and ``undersampled_ok`` is not set."""
    nyquist = imaging.nyquist_step_ang(cfg.microscope.energy_ev, cfg.microscope.convergence_mrad)
    step = cfg.scan_step_ang or nyquist
    pixel = cfg.fov_ang / max(cfg.output_shape)
    coarse = []
    if step > nyquist * (1 + 1e-6):
        coarse.append(f"simulation.scan_step_ang: {step:.4g} Å")
    if cfg.mode == "stem" and pixel > nyquist * (1 + 1e-6):
        coarse.append(f"simulation.output_shape: {list(cfg.output_shape)} over fov_ang {cfg.fov_ang:g} Å "
                      f"gives {pixel:.4g} Å pixels")
    if coarse and not cfg.undersampled_ok:
        raise UserError(
            f"{coarse[0]}, coarser than the probe's Nyquist step {nyquist:.4g} Å (lambda/4alpha at "
            f"{cfg.microscope.energy_ev / 1e3:g} keV, {cfg.microscope.convergence_mrad:g} mrad): the images "
            "would be aliased; use a finer step, or set simulation.undersampled_ok: true")
    return {"pixel_size_ang": float(pixel), "nyquist_step_ang": float(nyquist), "scan_step_ang": float(step),
            "undersampled": bool(coarse)}


def draw_imperfections(imperfections, rng: np.random.Generator) -> dict:
    """One value per :data:`IMPERFECTION_PARAMS`, each uniform in its configured range
    (angles uniform over a turn, 0 when their magnitude's range is off); ``{}`` for a
    perfect instrument (``imperfections`` None). The stream is consumed in a fixed order."""
    if imperfections is None:
        return {}
    out = {}
    for name in IMPERFECTION_PARAMS:
        if name in _ANGLES_DEG:
            magnitude, turn = _ANGLES_DEG[name]
            angle = float(rng.uniform(0.0, turn))
            out[name] = angle if getattr(imperfections, magnitude)[1] > 0 else 0.0
            continue
        lo, hi = getattr(imperfections, CONFIG_KEYS.get(name, name))
        out[name] = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    return out


def scan_positions(shape: Sequence[int], fov_ang: float, draws: Mapping[str, float], *,
                   flyback_decay_px: float, rng: np.random.Generator) -> np.ndarray:
    """Where the probe lands for each pixel ``(H, W, 2)`` [Å]: the pixel centres over the
    field of view, moved by the drawn jitter, drift and flyback."""
    positions = imaging.pixel_positions(shape, fov_ang)
    if not draws:
        return positions
    positions = imaging.jitter(positions, draws["jitter_ang"], rng)
    positions = imaging.drift(positions, draws["drift_x_ang_per_line"], draws["drift_y_ang_per_line"])
    return imaging.flyback(positions, draws["flyback_ang"], flyback_decay_px)


def probe_aberrations(draws: Mapping[str, float]) -> dict:
    """abTEM polar coefficients [Å, rad] of the drawn residual aberrations."""
    d = {name: float(draws.get(name, 0.0)) for name in IMPERFECTION_PARAMS}  # a missing one is off
    return {"C10": -d["residual_defocus_ang"], "C30": d["residual_cs_ang"],
            "C12": d["astigmatism_ang"], "phi12": math.radians(d["astigmatism_angle_deg"]),
            "C21": d["coma_ang"], "phi21": math.radians(d["coma_angle_deg"])}


def record(atoms, *, cell_ang: Sequence[float], positions_ang: np.ndarray, scan_step_ang: float,
           detectors: Mapping[str, Sequence[float]], draws: Mapping[str, float], focal_points: int = 1,
           **multislice_kwargs) -> np.ndarray:
    """Noiseless detector images ``(D, H, W)`` (fractions of the beam) at ``positions_ang``.

    The probe is scanned over the whole periodic cell ``cell_ang`` (x, y) [Å] at a step
    of at most ``scan_step_ang`` (:func:`simulation.multislice.stem_images` with the drawn
    aberrations and mistilt), once per focal point of the drawn focal spread (weighted
    incoherent sum); each image is blurred by the source in Fourier space and summed as a
    Fourier series at the positions. ``multislice_kwargs`` go to ``stem_images``
    (energy, convergence, sampling, slices, phonons, defocus_ang, cs_ang ...).
    """
    from simulation import multislice

    shape = imaging.scan_shape(cell_ang, scan_step_ang)
    fov = ((0.0, 0.0), (float(cell_ang[0]), float(cell_ang[1])))
    offsets, weights = imaging.focal_points(draws.get("focal_spread_ang", 0.0), focal_points)
    tilt = (0.0, 0.0)
    if draws.get("mistilt_mrad"):
        angle = math.radians(draws["mistilt_angle_deg"])
        tilt = (draws["mistilt_mrad"] * math.cos(angle), draws["mistilt_mrad"] * math.sin(angle))
    defocus = multislice_kwargs.pop("defocus_ang", 0.0)
    scan = 0.0
    for offset, weight in zip(offsets, weights):
        scan = scan + weight * multislice.stem_images(
            atoms, shape=shape, fov_ang=fov, detectors=dict(detectors), defocus_ang=defocus + offset,
            aberrations=probe_aberrations(draws), tilt_mrad=tilt, **multislice_kwargs).astype(np.float64)
    out = []
    for image in scan:
        coeffs = imaging.source_blur(imaging.spectrum(image), cell_ang, draws.get("source_fwhm_ang", 0.0))
        out.append(imaging.evaluate(coeffs, cell_ang, positions_ang))
    return np.stack(out)


def detect_all(images: np.ndarray, draws: Mapping[str, float], *, pixel_area_ang2: float,
               dose_e_per_ang2: Optional[float], rng: np.random.Generator) -> np.ndarray:
    """Each detector image as recorded (:func:`simulation.imaging.detect`) with the drawn
    dose, read noise, gain and offset; without drawn imperfections, Poisson noise at the
    fixed ``dose_e_per_ang2`` when given."""
    if not draws:
        draws = {"dose_e_per_ang2": dose_e_per_ang2 or 0.0, "read_noise_e": 0.0, "gain": 1.0, "offset_frac": 0.0}
    return np.stack([
        imaging.detect(image, dose_e_per_ang2=draws["dose_e_per_ang2"], pixel_area_ang2=pixel_area_ang2,
                       read_noise_e=draws["read_noise_e"], gain=draws["gain"], offset_frac=draws["offset_frac"],
                       rng=rng)
        for image in images
    ])
