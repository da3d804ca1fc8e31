"""Module for realistic simulated micrographs with their truth: what ``bench sim2real``
scores the reconstruction on and what ``stemnet calibrate --micrographs`` calibrates its
uncertainty on.

A micrograph is a periodic [001] specimen simulated with abTEM at the probe's Nyquist step
(the training data's own image formation, :mod:`simulation.stem`), averaged over frozen
phonon configurations (a real exposure is a thermal average; the truth is the static
structure, as in the labels), Fourier-interpolated (exact for the band-limited periodic
image) to ``pixel_ang`` (0.1 Å) pixel centres moved by drift and jitter, then dose
(Poisson), gain and offset. Its imperfections are either **held out**
(:data:`IMPERFECTIONS`: a larger source, linear drift, jitter, gain and offset outside the
training draws, aberration-free; :func:`held_out_thickness`; half the trained dose) or
**training-like** (:func:`training_draws`: drawn from the dataset's own ranges, a thickness
and dose in the trained range), so a calibration can be fitted on the second kind and
judged on the first.

Public API
----------
IMPERFECTIONS, GLAZER_SYSTEMS, PHONON_CONFIGS
simulate_micrograph(material, cells, thickness, distortion, sim, channels, rng, ...) -> (specimen, images, px, positions)
realistic_micrograph(info, sim, rng, *, held_out, glazer=None, ...) -> (specimen, Micrograph, material, meta)
training_draws(sim, rng) -> dict; held_out_thickness(sim) -> int
column_truth(specimen); match_columns(...); match_reconstruction(columns, specimen, a_ang) -> (truth, matched)
matched_displacements(columns, truth, matched, sublattice=None) -> (t, m, s)
truth_tilts(specimen, xy_ang); truth_tilt_z_from_O(...); truth_polarisation_pm(...)
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from stemnet.reconstruct.columns import rotation_deg

#: Held-out imperfections (outside the training draws), as :data:`simulation.stem.IMPERFECTION_PARAMS`
#: values: a larger source, linear drift (x per scan line: a shear), line jitter, gain and offset.
IMPERFECTIONS = {"source_fwhm_ang": 0.9, "drift_x_ang_per_line": 0.0004, "jitter_ang": 0.04, "gain": 7.3,
                 "offset_frac": 0.5}
#: Tilt systems of the held-out specimens: out of plane (a−a−c0, a−a−a−) and about the beam (a0a0c+).
GLAZER_SYSTEMS = ("a-a-c0", "a-a-a-", "a0a0c+")
#: Frozen-phonon configurations averaged per micrograph (the thermal average of an exposure).
PHONON_CONFIGS = 4



def truth_tilt_z_from_O(cols_xy, sub, disp, a, box) -> dict:
    """Per-cell tilt about z [deg] of the true O columns around each B, same rule as the
    reconstruction's estimate from the O displacements (``tilt_z_deg_from_O``): the four
    nearest O columns in the plane of the B (periodic cell ``box`` [Å]; the apical O column
    on the B site itself is left out). Returns {B column index: angle}."""
    from scipy.spatial import cKDTree

    box = np.asarray(box, np.float64)
    o = np.flatnonzero(sub == 2)
    tree = cKDTree(np.mod(cols_xy[o], box), boxsize=box)
    out = {}
    for i in np.flatnonzero(sub == 1):
        d, j = tree.query(np.mod(cols_xy[i], box), k=5)
        side = d > 0.1 * a
        d, j = d[side][:4], j[side][:4]
        if len(d) == 4 and np.all(d < 0.6 * a):
            r = cols_xy[o[j]] - cols_xy[i]
            r -= np.round(r / box) * box
            out[i] = rotation_deg(r[:, 0], r[:, 1], disp[o[j], 0], disp[o[j], 1])
    return out


def truth_tilts(specimen, xy_ang: np.ndarray) -> np.ndarray:
    """The true per-cell tilt angles (deg, about x, y, z) at the points ``xy_ang`` (N, 2)
    [Å] → (N, 3): :func:`simulation.labels.tilt_map`, the training labels' own rule (the
    octahedron of the cell's B column nearest the entrance surface)."""
    from simulation.labels import tilt_map

    return tilt_map(specimen, np.asarray(xy_ang, np.float64)[None])[:, 0, :].T.astype(np.float64)


def column_truth(specimen):
    """The specimen's true columns (:func:`simulation.labels.find_columns`), displacements
    relative to the mean of the A sublattice (the labels' frame A)."""
    from simulation.labels import find_columns

    t = find_columns(specimen)
    return t._replace(displacement=t.displacement - t.displacement[t.sublattice == 0].mean(0))


def match_columns(sublattice, xy_ang, truth, box_ang, a_ang: float, tolerance: float = 0.25) -> np.ndarray:
    """For each reconstructed column (``sublattice`` (N,), position ``xy_ang`` (N, 2) in
    the specimen's frame [Å]), the index of the nearest true column of the same sublattice
    (``truth``: :func:`column_truth`) in the periodic cell ``box_ang`` (x, y), or -1 if it
    is farther than ``tolerance`` lattice parameters."""
    from scipy.spatial import cKDTree

    box = np.broadcast_to(np.asarray(box_ang, np.float64), (2,)).copy()
    xy = np.mod(np.asarray(xy_ang, np.float64), box) % box
    sublattice = np.asarray(sublattice)
    matched = np.full(len(xy), -1)
    for s in range(3):
        on, ton = np.flatnonzero(sublattice == s), np.flatnonzero(truth.sublattice == s)
        if len(on) and len(ton):
            d, j = cKDTree(np.mod(truth.xy[ton], box) % box, boxsize=box).query(xy[on])
            ok = d < tolerance * a_ang
            matched[on[ok]] = ton[j[ok]]
    return matched


def truth_polarisation_pm(truth, index, box_ang) -> np.ndarray:
    """The true polarisation (pm, x and y) of the true B columns ``index``: the B column's
    displacement off the mean of its four nearest A columns (periodic cell ``box_ang``),
    the quantity the reconstruction's ``pol_*_pm`` columns measure."""
    from scipy.spatial import cKDTree

    box = np.broadcast_to(np.asarray(box_ang, np.float64), (2,)).copy()
    a = np.flatnonzero(truth.sublattice == 0)
    index = np.asarray(index, int)
    if not len(index):
        return np.zeros((0, 2))
    _, j = cKDTree(np.mod(truth.xy[a], box) % box, boxsize=box).query(np.mod(truth.xy[index], box) % box, k=4)
    return 100 * (truth.displacement[index, :2] - truth.displacement[a[j], :2].mean(axis=1))


def held_out_thickness(sim: dict) -> int:
    """One cell thicker than the thickest trained specimen, rounded up to even (anti-phase
    tilts and tilts about x or y close across the supercell only for an even thickness)."""
    m = int(max(sim["specimen"]["thickness_cells"])) + 1
    return m + m % 2


def training_draws(sim: dict, rng: np.random.Generator) -> dict:
    """One draw of every :data:`simulation.stem.IMPERFECTION_PARAMS` from the dataset's own
    ranges (``sim``: its simulation config), as a training sample gets, except the
    amorphous layer (none: it would repeat with the 2-cell period)."""
    from simulation import stem
    from simulation.config import ImperfectionsConfig

    draws = {name: 0.0 for name in stem.IMPERFECTION_PARAMS}
    draws.update(gain=1.0, dose_e_per_ang2=float(sim.get("noise_dose_e_per_ang2") or 2e5))
    if sim.get("imperfections") is not None:
        draws.update(stem.draw_imperfections(ImperfectionsConfig.model_validate(sim["imperfections"]), rng))
    draws["amorphous_ang"] = 0.0
    return draws


def simulate_micrograph(material, cells: int, thickness: int, distortion: dict, sim: dict, channels,
                        rng, *, pixel_ang: float = 0.1, dose: float = 1e5, imperfections: Optional[dict] = None,
                        draws: Optional[dict] = None, phonon_configs: int = PHONON_CONFIGS):
    """A realistic periodic [001] micrograph of ``material`` distorted by ``distortion``
    (keyword arguments of :func:`simulation.structures.build_specimen`: ``glazer``,
    ``tilt_deg``, ``polar_B_ang``), as the training data is made (:mod:`simulation.stem`):
    the probe scanned at its Nyquist step over the contracted periodic cell with the
    dataset's microscope and detectors (``sim``: its simulation config), averaged over
    ``phonon_configs`` frozen-phonon configurations with the dataset's r.m.s.
    displacements (a static lattice for 0, or if the dataset has none), source blur in Fourier space, the images summed
    as Fourier series at ``pixel_ang`` pixel centres moved by drift and jitter, then dose
    (Poisson), gain and offset. ``draws``: every imperfection (:func:`training_draws`);
    without it the held-out :data:`IMPERFECTIONS` (updated by ``imperfections``) at
    ``dose`` [e/Å²]. The field is ``cells`` cells wide; the specimen returned is its 2-cell
    period (the truth, matched modulo its cell). Returns (specimen, (C, n, n) images,
    pixel size Å, scan positions (n, n, 2) Å)."""
    from simulation import stem
    from simulation.generator import slice_thickness_ang
    from simulation.structures import build_specimen

    if draws is None:
        draws = {name: 0.0 for name in stem.IMPERFECTION_PARAMS}
        draws.update(IMPERFECTIONS, **(imperfections or {}), dose_e_per_ang2=float(dose))
    mic = sim["microscope"]
    energy, alpha = float(mic["energy_ev"]), float(mic["convergence_mrad"])
    nyquist = stem.imaging.nyquist_step_ang(energy, alpha)
    step = min(nyquist, float(sim["fov_ang"]) / max(sim["output_shape"]))
    # the distorted crystal repeats every 2 cells (every Glazer system): simulate that period
    # and sum its Fourier series over the ``cells``-wide field, the same image at 1/(cells/2)^4
    # of the cost of simulating the whole field (probe positions x wave grid)
    spec = build_specimen(material, 2, thickness, **distortion)
    cell = tuple(float(v) for v in np.diag(spec.atoms.cell.array)[:2])  # rigid octahedra: contracted
    field = cell[0] * cells / 2
    n = int(round(field / pixel_ang))
    p = field / n
    rms = (sim.get("distortion") or {}).get("phonon_rms_ang") or {}
    phonons = {el: float(rms.get(el, 0.0)) for el in set(spec.atoms.get_chemical_symbols())} \
        if rms and phonon_configs else None
    phonon_seed = int(rng.integers(2**31))
    positions = stem.scan_positions((n, n), field, draws, flyback_decay_px=1.0, rng=rng)
    focal_points = int((sim.get("imperfections") or {}).get("focal_points", 1)) if draws.get("focal_spread_ang") else 1
    images = stem.record(spec.atoms, cell_ang=cell, positions_ang=positions, scan_step_ang=step,
                         detectors=dict(sim["stem"]["detectors"]), draws=draws, focal_points=focal_points,
                         energy_ev=energy, convergence_mrad=alpha, defocus_ang=float(mic.get("defocus_ang", 0.0)),
                         cs_ang=float(mic.get("cs_ang", 0.0)), sampling_ang=float(sim["sampling_ang"]),
                         slice_thickness_ang=slice_thickness_ang(spec), phonon_rms_ang=phonons,
                         num_phonon_configs=max(1, phonon_configs), seed=phonon_seed)
    frames = stem.detect_all(images, draws, pixel_area_ang2=p * p, dose_e_per_ang2=draws["dose_e_per_ang2"],
                             rng=rng)
    names = [c.lower() for c in sim["stem"]["detectors"]]
    return spec, np.stack([frames[names.index(c)] for c in channels]), p, positions


def realistic_micrograph(info: dict, sim: dict, rng: np.random.Generator, *, held_out: bool,
                         glazer: Optional[str] = None, pixel_ang: float = 0.1, min_px: int = 256,
                         imperfections: Optional[dict] = None, name: str = "micrograph",
                         phonon_configs: int = PHONON_CONFIGS, index: int = 0):
    """One realistic micrograph for the run ``info`` (its ``data.json``) trained on ``sim``.

    ``held_out``: the first trained material, the Glazer system ``glazer``, angles in the
    upper half of the trained range, :func:`held_out_thickness`, half the trained dose
    and :data:`IMPERFECTIONS`. Otherwise everything inside the training draws: a trained
    material, angles, :func:`training_draws`, and -- in turn with ``index``, so that a few
    micrographs span them -- the trained even thicknesses and Glazer systems (``glazer``
    overrides it), the drift per line scaled to the finer lines (the lattice strained as in
    training). The field
    is at least ``min_px`` pixels of about ``pixel_ang`` Å, an even number of cells.
    ``phonon_configs`` as :func:`simulate_micrograph`. Returns (specimen,
    :class:`~stemnet.reconstruct.micrograph.Micrograph`, material, meta).
    """
    from simulation.structures import draw_distortion, material_from_dict
    from stemnet.reconstruct.micrograph import Micrograph

    names = list(info["materials"])
    pick = names[0] if held_out else names[int(rng.integers(len(names)))]
    material = material_from_dict(pick, info["materials"][pick])
    cells = 2 * int(math.ceil(min_px * pixel_ang / material.a / 2))  # even: every tilt system closes
    lo, hi = (float(t) for t in sim["distortion"]["tilt_deg"])
    draws = None
    if held_out:
        thickness = held_out_thickness(sim)
        dose = 0.5 * float(sim.get("noise_dose_e_per_ang2") or 2e5)
        systems, tilt_range = [glazer or GLAZER_SYSTEMS[0]], (max(lo, 0.5 * (lo + hi)), hi)
    else:
        t_lo, t_hi = (int(t) for t in sim["specimen"]["thickness_cells"])
        evens = [t for t in range(t_lo, t_hi + 1) if t % 2 == 0] or [t_hi]
        thickness = int(evens[index % len(evens)])  # stratified: micrograph ``index`` takes them in turn
        trained = list(sim["distortion"]["glazer"])
        systems, tilt_range = [glazer or trained[index % len(trained)]], (lo, hi)
        draws = training_draws(sim, rng)
        # drift per scan line at the micrograph's finer lines: the same strain as in training
        per_line = pixel_ang / (float(sim["fov_ang"]) / max(sim["output_shape"]))
        for key in ("drift_x_ang_per_line", "drift_y_ang_per_line"):
            draws[key] *= per_line
        dose = draws["dose_e_per_ang2"]
    trained_a, trained_b = (float(sim["distortion"].get(k) or 0.0) for k in ("polar_A_ang", "polar_B_ang"))
    # held out: B-site polarisation only (at most 0.12 Å); training-like: the trained ranges
    polar_a, polar_b = (0.0, min(trained_b or 0.12, 0.12)) if held_out else (trained_a, trained_b)
    distortion = draw_distortion(rng, glazer_systems=systems, tilt_range_deg=tilt_range, polar_A_max_ang=polar_a,
                                 polar_B_max_ang=polar_b)
    for key in ("polar_A_ang", "polar_B_ang"):  # [001]: dz is not seen
        distortion[key] = tuple(distortion[key][:2]) + (0.0,)
    channels = [c.lower() for c in info["input_channels"]]
    spec, frames, p, _ = simulate_micrograph(material, cells, thickness, distortion, sim, channels, rng,
                                             pixel_ang=pixel_ang, dose=dose, imperfections=imperfections,
                                             draws=draws, phonon_configs=phonon_configs)
    micrograph = Micrograph(frames, (p, p), channels, [], name, "file")
    meta = {"glazer": distortion["glazer"], "tilt_deg": list(distortion["tilt_deg"]),
            "polar_A_ang": list(distortion["polar_A_ang"]), "polar_B_ang": list(distortion["polar_B_ang"]), "material": material.name, "pixels": frames.shape[-1],
            "pixel_ang": p, "thickness_cells": thickness, "dose_e_per_ang2": dose, "phonon_configs": phonon_configs,
            "held_out": held_out}
    return spec, micrograph, material, meta


def match_reconstruction(columns: dict, specimen, a_ang: float):
    """The specimen's true columns (:func:`column_truth`) and, per row of a reconstructed
    column table ``columns``, the index of its true column or -1 (:func:`match_columns`
    at the ideal positions, in the specimen's periodic cell). Returns (truth, matched)."""
    truth = column_truth(specimen)
    matched = match_columns(columns["sublattice"], np.column_stack([columns["ideal_x_ang"], columns["ideal_y_ang"]]),
                            truth, np.diag(specimen.atoms.cell.array)[:2], a_ang)
    return truth, matched


def matched_displacements(columns: dict, truth, matched: np.ndarray, sublattice: Optional[int] = None):
    """Truth, network mean and spread [Å] of the in-plane displacements (dx, dy) of every
    reconstructed column matched to a true one (``truth``, ``matched``:
    :func:`match_reconstruction`; of ``sublattice`` 0 A, 1 B, 2 O only, if given): three
    (N, 2) arrays."""
    m = (matched >= 0) & (sublattice is None or columns["sublattice"] == sublattice)
    t = truth.displacement[matched[m], :2]
    mean = np.column_stack([columns["dx_ang"][m], columns["dy_ang"][m]])
    std = np.column_stack([columns["std_dx_ang"][m], columns["std_dy_ang"][m]])
    return t, mean, std
