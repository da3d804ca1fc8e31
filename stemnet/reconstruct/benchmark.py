"""Module for ``stemnet bench sim2real``: the reconstruction judged on realistic held-out micrographs.

Each micrograph is a periodic [001] specimen the run never saw, simulated with abTEM at
the probe's Nyquist step, Fourier-interpolated (exact for the band-limited periodic
image) to ``pixel_ang`` (0.1 Å) over at least ``min_px`` pixels, then given
imperfections outside the training draws (:mod:`simulation.stem`, the training data's
own image formation): a larger source (Gaussian, FWHM in Å), linear scan drift (a
shear), scan-line jitter, another thickness (one cell more than the thickest trained,
even) and another dose (half the trained one), Poisson noise. The specimens have tilt
systems out of the image plane (a−a−c0, a−a−a−) and about the beam (a0a0c+), angles in
the trained range. Each is reconstructed at that native calibration; every column is
matched to its true column. Reported (JSON): per-column dx/dy RMSE in pm of the network
and of the Gaussian-fit baseline (A and B columns, relative to the A lattice), dz RMSE
against zero, the tilt MAE per B column of the network's tilt head about z
(``tilt_mae_deg_inplane``) and about x and y (``tilt_mae_deg_out_of_plane``) against the
truth (:func:`truth_tilts`) and the zero baseline, the estimate about z from the O
displacements (``tilt_mae_deg_inplane_from_O``), 1σ coverage, and the seam ratio (mean
error of the same columns within a pixel of a tile border / inside a tile, over eight
positions of the tile grid: :func:`seam_errors`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from stemnet.errors import UserError

#: Held-out imperfections (outside the training draws), as :data:`simulation.stem.IMPERFECTION_PARAMS`
#: values: a larger source, linear drift (x per scan line: a shear), line jitter, gain and offset.
IMPERFECTIONS = {"source_fwhm_ang": 0.9, "drift_x_ang_per_line": 0.0004, "jitter_ang": 0.04, "gain": 7.3,
                 "offset_frac": 0.5}
#: Tilt systems of the held-out specimens: out of plane (a−a−c0, a−a−a−) and about the beam (a0a0c+).
GLAZER_SYSTEMS = ("a-a-c0", "a-a-a-", "a0a0c+")


def _truth_tilt(cols_xy, sub, disp, a, box):
    """Per-cell tilt about z [deg] of the true O columns around each B, same rule as the
    reconstruction's estimate from the O displacements (``tilt_z_deg_from_O``): the four
    nearest O columns in the plane of the B (periodic cell ``box`` [Å]; the apical O column
    on the B site itself is left out)."""
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
            t = disp[o[j]]
            out[i] = math.degrees(float(np.mean((r[:, 0] * t[:, 1] - r[:, 1] * t[:, 0]) / (r**2).sum(1))))
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


def simulate_micrograph(material, cells: int, thickness: int, distortion: dict, sim: dict, channels,
                        rng, *, pixel_ang: float = 0.1, dose: float = 1e5, imperfections: Optional[dict] = None):
    """A realistic periodic [001] micrograph of ``material`` distorted by ``distortion``
    (keyword arguments of :func:`simulation.structures.build_specimen`: ``glazer``,
    ``tilt_deg``, ``polar_B_ang``), as the training data is made (:mod:`simulation.stem`):
    the probe scanned at its Nyquist step over the contracted periodic cell with the
    dataset's microscope and detectors (``sim``: its simulation config), source blur in
    Fourier space, the images summed as Fourier series at ``pixel_ang`` pixel centres
    moved by drift and jitter, then dose (Poisson), gain and offset. The field is ``cells``
    cells wide; the specimen returned is its 2-cell period (the truth, matched modulo its
    cell). Returns (specimen, (C, n, n) images, pixel size Å, scan positions (n, n, 2) Å)."""
    from simulation import stem
    from simulation.generator import slice_thickness_ang
    from simulation.structures import build_specimen

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
    positions = stem.scan_positions((n, n), field, draws, flyback_decay_px=1.0, rng=rng)
    images = stem.record(spec.atoms, cell_ang=cell, positions_ang=positions, scan_step_ang=step,
                         detectors=dict(sim["stem"]["detectors"]), draws=draws, energy_ev=energy,
                         convergence_mrad=alpha, sampling_ang=float(sim["sampling_ang"]),
                         slice_thickness_ang=slice_thickness_ang(spec))
    frames = stem.detect_all(images, draws, pixel_area_ang2=p * p, dose_e_per_ang2=dose, rng=rng)
    names = [c.lower() for c in sim["stem"]["detectors"]]
    return spec, np.stack([frames[names.index(c)] for c in channels]), p, positions


def seam_errors(predict, micrograph, info: dict, norm, truth, box_ang, a_ang: float, run_pixel_ang: float, *,
                phases: int = 8, uncertainty=None, first_columns=None):
    """|in-plane error| [Å] of the same columns near a tile border and inside a tile.

    The micrograph is cropped at its top left by ``k/phases`` of the tile stride (k = 0 …
    phases−1, in run pixels), which moves the tile grid over the crystal; in each phase a
    matched column is *near* when it lies within one run pixel of a tile border (every
    ``tile // 2`` run pixels, the blended tiles' stride). Only columns seen both near and
    inside count, so the two sets hold the same columns and their ratio measures the tiling
    alone, not which columns happen to lie on the tile grid (the grid's period is about
    one lattice cell). ``first_columns``: the uncropped reconstruction's column table, when
    the caller has it (phase 0 is then not reconstructed again). Returns (near errors,
    inside errors)."""
    from scipy.spatial import cKDTree

    from stemnet.reconstruct.micrograph import Micrograph
    from stemnet.reconstruct.pipeline import reconstruct

    half = int(info["input_shape"][0]) // 2
    p = float(micrograph.pixel_size_ang[1])
    box = np.asarray(box_ang, np.float64)
    seen = {}  # column key -> ([errors near], [errors inside])
    ref = None
    for k in range(phases):
        crop = int(round(k * half / phases * run_pixel_ang / p))  # micrograph pixels
        cropped = Micrograph(micrograph.data[:, crop:, crop:], micrograph.pixel_size_ang, micrograph.channels,
                             micrograph.sources, f"{micrograph.name}-phase{k}", micrograph.calibration)
        c = first_columns if k == 0 and first_columns is not None else \
            reconstruct(predict, cropped, info, norm, uncertainty=uncertainty).columns
        local = np.column_stack([c["ideal_x_ang"], c["ideal_y_ang"]])
        absolute = local + crop * p
        matched = match_columns(c["sublattice"], absolute, truth, box, a_ang)
        m = np.flatnonzero(matched >= 0)
        e = np.linalg.norm(np.column_stack([c["dx_ang"][m], c["dy_ang"][m]]) - truth.displacement[matched[m], :2], axis=1)
        u = local[m] / run_pixel_ang - 0.5
        near = np.any(np.minimum(np.mod(u, half), half - np.mod(u, half)) <= 1.0, axis=1)
        if ref is None:
            ref = cKDTree(absolute[m])
        dist, key = ref.query(absolute[m])
        for err, is_near, d, j in zip(e, near, dist, key):
            if d < 0.25 * a_ang:
                seen.setdefault(int(j), ([], []))[0 if is_near else 1].append(float(err))
    both = [v for v in seen.values() if v[0] and v[1]]
    return np.array([x for v in both for x in v[0]]), np.array([x for v in both for x in v[1]])


def bench_sim2real(run, data, *, samples: int = 3, pixel_ang: float = 0.1, min_px: int = 256, seed: int = 11,
                   imperfections: Optional[dict] = None, glazer_systems=GLAZER_SYSTEMS,
                   progress: bool = True) -> dict:
    """Score RUN (trained on dataset DATA) on ``samples`` held-out realistic micrographs;
    micrograph ``k`` has Glazer system ``glazer_systems[k % len]`` with angles drawn in the
    upper part of the trained range."""
    from simulation.structures import draw_distortion, material_from_dict
    from stemnet.data import Normalization, tilt_target
    from stemnet.reconstruct.ensemble import keras_predictor
    from stemnet.reconstruct.micrograph import Micrograph
    from stemnet.reconstruct.pipeline import load_uncertainty, reconstruct, run_info
    from stemnet.shards import read_manifest
    from stemnet.train.run import load_run

    info, norm_dict = run_info(run)
    norm = Normalization.from_dict(norm_dict)
    sim = read_manifest(data).get("extra", {}).get("simulation")
    if not sim:
        raise UserError(f"{data}/manifest.json: no simulation config; expected the run's training dataset")
    imperfections = dict(IMPERFECTIONS, **(imperfections or {}))
    name, mat = next(iter(info["materials"].items()))
    material = material_from_dict(name, mat)
    cells = 2 * int(math.ceil(min_px * pixel_ang / material.a / 2))  # even: every tilt system closes
    thickness = held_out_thickness(sim)
    dose = 0.5 * float(sim.get("noise_dose_e_per_ang2") or 2e5)
    lo, hi = (float(t) for t in sim["distortion"]["tilt_deg"])
    tilt_range = (max(lo, 0.5 * (lo + hi)), hi)  # in the trained range, large enough to see
    model, *_ = load_run(run)
    predict = keras_predictor(model)
    uncertainty = load_uncertainty(run)
    rng = np.random.default_rng(seed)
    has_tilt = "tilt" in info["targets"]
    rows = []
    errs = {k: [] for k in ("net", "fit", "dz", "dz0", "tz", "tz0", "tz_O", "tz_O_truth", "txy", "txy0", "z",
                            "border", "inner")}
    for k in range(samples):
        glazer = glazer_systems[k % len(glazer_systems)]
        distortion = draw_distortion(rng, glazer_systems=[glazer], tilt_range_deg=tilt_range, polar_A_max_ang=0.0,
                                     polar_B_max_ang=0.12)
        distortion["polar_B_ang"] = distortion["polar_B_ang"][:2] + (0.0,)  # [001]: dz is not seen
        channels = [c.lower() for c in info["input_channels"]]
        spec, frames, p, _ = simulate_micrograph(material, cells, thickness, distortion, sim, channels, rng,
                                                 pixel_ang=pixel_ang, dose=dose, imperfections=imperfections)
        n = frames.shape[-1]
        micrograph = Micrograph(frames, (p, p), channels, [], f"sim2real-{k}", "file")
        rec = reconstruct(predict, micrograph, info, norm, uncertainty=uncertainty, progress=progress)
        truth = column_truth(spec)
        t_xy, t_sub, t_d = truth.xy, truth.sublattice, truth.displacement
        c = rec.columns
        matched = match_columns(c["sublattice"], np.column_stack([c["ideal_x_ang"], c["ideal_y_ang"]]), truth,
                                np.diag(spec.atoms.cell.array)[:2], material.a)
        m = matched >= 0
        cat = m & (c["sublattice"] < 2)
        td = t_d[matched[cat]]
        net = np.column_stack([c["dx_ang"][cat], c["dy_ang"][cat]])
        fit = np.column_stack([c["fit_dx_ang"][cat], c["fit_dy_ang"][cat]])
        good = np.all(np.isfinite(fit), axis=1)
        errs["net"].append((net[good] - td[good, :2]).ravel())
        errs["fit"].append((fit[good] - td[good, :2]).ravel())
        errs["dz"].append(c["dz_ang"][m] - t_d[matched[m], 2])
        errs["dz0"].append(t_d[matched[m], 2])
        std = np.column_stack([c["std_dx_ang"][m], c["std_dy_ang"][m]])
        e = np.column_stack([c["dx_ang"][m], c["dy_ang"][m]]) - t_d[matched[m], :2]
        errs["z"].append((np.abs(e) <= std).ravel())
        # tilts per B column: the network's tilt head against the labels' rule, and the
        # estimate about z from the O displacements against the same rule on the true O
        b = np.flatnonzero((c["sublattice"] == 1) & m)
        true_t = truth_tilts(spec, t_xy[matched[b]])
        if has_tilt:
            net_t = np.column_stack([c[f"tilt_{axis}_deg"][b] for axis in "xyz"])
            ok = np.all(np.isfinite(net_t), axis=1)
            want = tilt_target(true_t[ok])  # the head predicts magnitudes
            errs["txy"].append(np.abs(net_t[ok, :2] - want[:, :2]).ravel())
            errs["tz"].append(np.abs(net_t[ok, 2] - want[:, 2]))
        errs["txy0"].append(np.abs(true_t[:, :2]).ravel())
        errs["tz0"].append(np.abs(true_t[:, 2]))
        from_o = _truth_tilt(t_xy, t_sub, t_d, material.a, np.diag(spec.atoms.cell.array)[:2])
        for i in b:
            j = matched[i]
            if j in from_o and np.isfinite(c["tilt_z_deg_from_O"][i]):
                errs["tz_O"].append([abs(c["tilt_z_deg_from_O"][i] - from_o[j])])
                errs["tz_O_truth"].append([abs(from_o[j])])
        border, inner = seam_errors(predict, micrograph, info, norm, truth, np.diag(spec.atoms.cell.array)[:2],
                                    material.a, rec.pixel_size_ang, uncertainty=uncertainty, first_columns=c)
        errs["border"].append(border)
        errs["inner"].append(inner)
        rows.append({"glazer": distortion["glazer"], "tilt_deg": list(distortion["tilt_deg"]),
                     "truth_mean_abs_tilt_deg": np.abs(true_t).mean(axis=0).tolist() if len(true_t) else None,
                     "polar_B_ang": list(distortion["polar_B_ang"]), "pixels": n, "pixel_ang": p,
                     "thickness_cells": thickness, "dose_e_per_ang2": dose, "columns_matched": int(m.sum()),
                     "b_columns_matched": int(len(b)), "lattice_check": rec.summary.get("lattice_check")})
    cat = {k: np.concatenate([np.ravel(v) for v in vals]) if vals else np.zeros(0) for k, vals in errs.items()}
    rms = lambda v: float(np.sqrt(np.mean(np.square(v)))) if len(v) else None  # noqa: E731
    mae = lambda v: float(np.mean(np.abs(v))) if len(v) else None  # noqa: E731
    pm = lambda v: None if v is None else 100 * v  # noqa: E731
    result = {
        "dxdy_rmse_pm_network": pm(rms(cat["net"])),
        "dxdy_rmse_pm_gaussian_fit": pm(rms(cat["fit"])),
        "dz_rmse_pm_network": pm(rms(cat["dz"])), "dz_rmse_pm_zero": pm(rms(cat["dz0"])),
        "tilt_mae_deg_inplane": mae(cat["tz"]) if has_tilt else mae(cat["tz_O"]),
        "tilt_mae_deg_inplane_zero": mae(cat["tz0"]) if has_tilt else mae(cat["tz_O_truth"]),
        "tilt_mae_deg_inplane_from_O": mae(cat["tz_O"]), "tilt_mae_deg_inplane_from_O_zero": mae(cat["tz_O_truth"]),
        "tilt_mae_deg_out_of_plane": mae(cat["txy"]) if has_tilt else None,
        "tilt_mae_deg_out_of_plane_zero": mae(cat["txy0"]),
        "coverage_1sigma": float(np.mean(cat["z"])) if len(cat["z"]) else None,
        "seam_ratio": float(np.mean(cat["border"]) / np.mean(cat["inner"])) if len(cat["border"]) and len(cat["inner"]) else None,
        "variance_scale": float(uncertainty.get("variance_scale", 1.0)),
        "imperfections": dict(imperfections, thickness_cells=thickness, dose_e_per_ang2=dose),
        "micrographs": rows,
        "notes": ("tilt: per B column, the network's tilt head (about z: inplane; about x and y: out_of_plane) "
                  "against the truth of the specimen by the labels' rule (simulation.labels.tilt_map), the zero "
                  "baseline the mean |truth|; inplane_from_O: the estimate from the O displacements against the "
                  "same rule on the true O columns" if has_tilt else
                  "the run predicts no tilt head: tilt_mae_deg_inplane is the estimate from the O displacements, "
                  "tilt_mae_deg_out_of_plane None against the zero baseline of the specimens' out-of-plane tilts"),
    }
    net, fit = result["dxdy_rmse_pm_network"], result["dxdy_rmse_pm_gaussian_fit"]
    result["ratio_network_vs_gaussian_fit"] = net / fit if net is not None and fit else None
    if has_tilt and result["tilt_mae_deg_out_of_plane"] is not None and result["tilt_mae_deg_out_of_plane_zero"]:
        result["ratio_out_of_plane_vs_zero"] = result["tilt_mae_deg_out_of_plane"] / result["tilt_mae_deg_out_of_plane_zero"]
    return result


def write(result: dict, path) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
