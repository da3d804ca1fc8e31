"""Module for ``stemnet bench sim2real``: the reconstruction judged on realistic held-out micrographs.

Each micrograph is a periodic [001] specimen the run never saw, simulated with abTEM at
the probe's Nyquist step, Fourier-interpolated (exact for the band-limited periodic
image) to ``pixel_ang`` (0.1 Å) over at least ``min_px`` pixels, then given
imperfections outside the training draws (:mod:`simulation.stem`, the training data's
own image formation): a larger source (Gaussian, FWHM in Å), linear scan drift (a
shear), scan-line jitter, another thickness (one cell more than the thickest trained,
even) and another dose (half the trained one), Poisson noise. The specimens have tilt
systems out of the image plane (a−a−c0, a−a−a−) and about the beam (a0a0c+), angles in
the trained range, averaged over frozen phonons (:mod:`.heldout`). Each is reconstructed
at that native calibration; every column is matched to its true column. Reported (JSON): per-column dx/dy RMSE in pm of the network
and of the Gaussian-fit baseline (A and B columns, relative to the A lattice; and the B
columns alone, ``dxdy_rmse_pm_B_*``: the network's A columns sit on the frame by
construction, the fit's carry its noise), the O
columns' dx/dy RMSE and correlation with the truth (``dxdy_*_O_*``), dz RMSE
against zero, the tilt MAE per B column of the network's tilt head about z
(``tilt_mae_deg_inplane``) and about x and y (``tilt_mae_deg_out_of_plane``) against the
truth (:func:`truth_tilts`), the zero baseline and the constant training-mean baseline
(``…_mean``: a head that ignores its input), the estimate about z from the O
displacements (``tilt_mae_deg_inplane_from_O``), 1σ coverage of the B and O columns' dx,
dy (the A columns, the frame, separately: ``coverage_1sigma_per_sublattice``), and the
seam ratio (mean error of the same columns within a pixel of a tile border / inside a tile, over eight
positions of the tile grid: :func:`seam_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from stemnet.errors import UserError
from stemnet.reconstruct.columns import SUBLATTICES
from stemnet.reconstruct.heldout import (GLAZER_SYSTEMS, IMPERFECTIONS, PHONON_CONFIGS, match_columns,
                                         match_reconstruction, matched_displacements, realistic_micrograph,
                                         truth_tilt_z_from_O, truth_tilts)

def seam_errors(predict, micrograph, info: dict, norm, truth, box_ang, a_ang: float, run_pixel_ang: float, *,
                phases: int = 8, uncertainty=None, first_columns=None):
    """|in-plane error| [Å] of the same columns near a tile border and inside a tile.

    The micrograph is cropped at its top left by ``k/phases`` of the tile stride (k = 0 …
    phases−1, in run pixels), which moves the tile grid over the crystal; in each phase a
    matched column is *near* when it lies within one run pixel of a tile border (every
    :func:`~stemnet.reconstruct.tiling.tile_stride` run pixels, between a tile's last pixel
    and the next tile's first). Only columns seen both near and
    inside count, so the two sets hold the same columns and their ratio measures the tiling
    alone, not which columns happen to lie on the tile grid (the grid's period is about
    one lattice cell). ``first_columns``: the uncropped reconstruction's column table, when
    the caller has it (phase 0 is then not reconstructed again). Returns (near errors,
    inside errors)."""
    from scipy.spatial import cKDTree

    from stemnet.reconstruct.micrograph import Micrograph
    from stemnet.reconstruct.pipeline import reconstruct
    from stemnet.reconstruct.tiling import tile_stride

    stride = tile_stride(int(info["input_shape"][0]))
    p = float(micrograph.pixel_size_ang[1])
    box = np.asarray(box_ang, np.float64)
    seen = {}  # column key -> ([errors near], [errors inside])
    ref = None
    for k in range(phases):
        crop = int(round(k * stride / phases * run_pixel_ang / p))  # micrograph pixels
        cropped = Micrograph(micrograph.data[:, crop:, crop:], micrograph.pixel_size_ang, micrograph.channels,
                             micrograph.sources, f"{micrograph.name}-phase{k}", micrograph.calibration)
        c = first_columns if k == 0 and first_columns is not None else \
            reconstruct(predict, cropped, info, norm, uncertainty=uncertainty).columns
        local = np.column_stack([c["ideal_x_ang"], c["ideal_y_ang"]])
        absolute = local + crop * p
        matched = match_columns(c["sublattice"], absolute, truth, box, a_ang)
        m = np.flatnonzero(matched >= 0)
        e = np.linalg.norm(np.column_stack([c["dx_ang"][m], c["dy_ang"][m]]) - truth.displacement[matched[m], :2], axis=1)
        u = np.mod(local[m] / run_pixel_ang, stride)  # run pixels past the last border (at pixel edges)
        near = np.any(np.minimum(u, stride - u) <= 1.0, axis=1)
        if ref is None:
            ref = cKDTree(absolute[m])
        dist, key = ref.query(absolute[m])
        for err, is_near, d, j in zip(e, near, dist, key):
            if d < 0.25 * a_ang:
                seen.setdefault(int(j), ([], []))[0 if is_near else 1].append(float(err))
    both = [v for v in seen.values() if v[0] and v[1]]
    return np.array([x for v in both for x in v[0]]), np.array([x for v in both for x in v[1]])


def _mean_tilt_target(data, info: dict, norm) -> np.ndarray:
    """The training split's mean tilt-head target (|angle| per axis, deg): the constant
    baseline (``tilt_mae_deg_*_mean``) a head that ignores its input would come closest to."""
    from stemnet.evaluate import training_means
    from stemnet.shards import close_shards

    means = training_means(data, info, norm)["tilt"]
    close_shards(data)  # the pipeline's LMDB handles: nothing else in this process may open them otherwise
    return np.asarray(means, np.float64).reshape(-1, 3).mean(axis=0)


def bench_sim2real(run, data, *, samples: int = 6, pixel_ang: float = 0.1, min_px: int = 256, seed: int = 11,
                   imperfections: Optional[dict] = None, glazer_systems=GLAZER_SYSTEMS,
                   progress: bool = True, phonon_configs: int = PHONON_CONFIGS) -> dict:
    """Score RUN (trained on dataset DATA) on ``samples`` held-out realistic micrographs;
    micrograph ``k`` has Glazer system ``glazer_systems[k % len]`` with angles drawn in the
    upper part of the trained range."""
    from stemnet.data import Normalization, tilt_target
    from stemnet.reconstruct.ensemble import keras_predictor
    from stemnet.reconstruct.pipeline import load_uncertainty, reconstruct, run_info, variance_scales
    from stemnet.shards import read_manifest
    from stemnet.train.run import load_run

    info, norm_dict = run_info(run)
    norm = Normalization.from_dict(norm_dict)
    sim = read_manifest(data).get("extra", {}).get("simulation")
    if not sim:
        raise UserError(f"{data}/manifest.json: no simulation config; expected the run's training dataset")
    imperfections = dict(IMPERFECTIONS, **(imperfections or {}))
    model, *_ = load_run(run)
    predict = keras_predictor(model)
    uncertainty = load_uncertainty(run)
    has_tilt = "tilt" in info["targets"]
    # the constant a head that ignores its input would best give: the training split's mean target
    mean_tilt = _mean_tilt_target(data, info, norm) if has_tilt else None
    rows = []
    errs = {k: [] for k in ("net", "fit", "dz", "dz0", "tz", "tz0", "tz_O", "tz_O_truth", "tz_O_fit", "tz_O_fit_truth",
                            "txy", "txy0", "z0", "z1", "z2", "o_net", "o_true", "o_fit",
                            "border", "inner", "txy_mean", "tz_mean", "net_B", "fit_B")}
    for k in range(samples):
        rng = np.random.default_rng([seed, k])  # micrograph k is a function of (seed, k) alone
        spec, micrograph, material, meta = realistic_micrograph(
            info, sim, rng, held_out=True, glazer=glazer_systems[k % len(glazer_systems)], pixel_ang=pixel_ang,
            min_px=min_px, imperfections=imperfections, name=f"sim2real-{k}", phonon_configs=phonon_configs)
        rec = reconstruct(predict, micrograph, info, norm, uncertainty=uncertainty, progress=progress)
        c = rec.columns
        truth, matched = match_reconstruction(c, spec, material.a)
        t_xy, t_sub, t_d = truth.xy, truth.sublattice, truth.displacement
        m = matched >= 0
        cat = m & (c["sublattice"] < 2)
        td = t_d[matched[cat]]
        net = np.column_stack([c["dx_ang"][cat], c["dy_ang"][cat]])
        fit = np.column_stack([c["fit_dx_ang"][cat], c["fit_dy_ang"][cat]])
        good = np.all(np.isfinite(fit), axis=1)
        errs["net"].append((net[good] - td[good, :2]).ravel())
        errs["fit"].append((fit[good] - td[good, :2]).ravel())
        b_only = good & (c["sublattice"][cat] == 1)  # the A columns are the frame: their truth is 0
        errs["net_B"].append((net[b_only] - td[b_only, :2]).ravel())
        errs["fit_B"].append((fit[b_only] - td[b_only, :2]).ravel())
        errs["dz"].append(c["dz_ang"][m] - t_d[matched[m], 2])
        errs["dz0"].append(t_d[matched[m], 2])
        for sub in range(3):  # 1σ coverage per sublattice
            t_in, mean_in, std_in = matched_displacements(c, truth, matched, sublattice=sub)
            errs[f"z{sub}"].append((np.abs(mean_in - t_in) <= std_in).ravel())
            if sub == 2:  # the O columns: what the tilts move
                errs["o_net"].append(mean_in.ravel())
                errs["o_true"].append(t_in.ravel())
        o_cols = m & (c["sublattice"] == 2)
        o_fit = np.column_stack([c["fit_dx_ang"][o_cols], c["fit_dy_ang"][o_cols]])
        o_ok = np.all(np.isfinite(o_fit), axis=1)  # the O columns the ABF fit found
        errs["o_fit"].append((o_fit[o_ok] - t_d[matched[o_cols][o_ok], :2]).ravel())
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
            errs["txy_mean"].append(np.abs(mean_tilt[:2] - want[:, :2]).ravel())
            errs["tz_mean"].append(np.abs(mean_tilt[2] - want[:, 2]))
        errs["txy0"].append(np.abs(true_t[:, :2]).ravel())
        errs["tz0"].append(np.abs(true_t[:, 2]))
        from_o = truth_tilt_z_from_O(t_xy, t_sub, t_d, material.a, np.diag(spec.atoms.cell.array)[:2])
        for i in b:
            j = matched[i]
            # the network's O displacements, and the fitted O columns (the classical estimate)
            for err, column in (("tz_O", "tilt_z_deg_from_O"), ("tz_O_fit", "tilt_z_deg_from_O_fit")):
                if j in from_o and np.isfinite(c[column][i]):
                    errs[err].append([abs(c[column][i] - from_o[j])])
                    errs[f"{err}_truth"].append([abs(from_o[j])])
        border, inner = seam_errors(predict, micrograph, info, norm, truth, np.diag(spec.atoms.cell.array)[:2],
                                    material.a, rec.pixel_size_ang, uncertainty=uncertainty, first_columns=c)
        errs["border"].append(border)
        errs["inner"].append(inner)
        rows.append(dict(meta, truth_mean_abs_tilt_deg=np.abs(true_t).mean(axis=0).tolist() if len(true_t) else None,
                         columns_matched=int(m.sum()), b_columns_matched=int(len(b)),
                         lattice_check=rec.summary.get("lattice_check")))
    cat = {k: np.concatenate([np.ravel(v) for v in vals]) if vals else np.zeros(0) for k, vals in errs.items()}
    rms = lambda v: float(np.sqrt(np.mean(np.square(v)))) if len(v) else None  # noqa: E731
    mae = lambda v: float(np.mean(np.abs(v))) if len(v) else None  # noqa: E731
    mean = lambda v: float(np.mean(v)) if len(v) else None  # noqa: E731
    pm = lambda v: None if v is None else 100 * v  # noqa: E731
    result = {
        "dxdy_rmse_pm_network": pm(rms(cat["net"])),
        "dxdy_rmse_pm_gaussian_fit": pm(rms(cat["fit"])),
        "dxdy_rmse_pm_B_network": pm(rms(cat["net_B"])), "dxdy_rmse_pm_B_gaussian_fit": pm(rms(cat["fit_B"])),
        "dxdy_rmse_pm_O_network": pm(rms(cat["o_net"] - cat["o_true"])), "dxdy_rmse_pm_O_zero": pm(rms(cat["o_true"])),
        "dxdy_rmse_pm_O_gaussian_fit": pm(rms(cat["o_fit"])),
        "dxdy_slope_O_network": _slope(cat["o_net"], cat["o_true"]),
        "dxdy_corr_O_network": float(np.corrcoef(cat["o_net"], cat["o_true"])[0, 1])
        if len(cat["o_true"]) > 1 and np.std(cat["o_true"]) > 0 and np.std(cat["o_net"]) > 0 else None,
        "dz_rmse_pm_network": pm(rms(cat["dz"])), "dz_rmse_pm_zero": pm(rms(cat["dz0"])),
        "tilt_mae_deg_inplane": mae(cat["tz"]) if has_tilt else mae(cat["tz_O"]),
        "tilt_mae_deg_inplane_zero": mae(cat["tz0"]) if has_tilt else mae(cat["tz_O_truth"]),
        "tilt_mae_deg_inplane_mean": mae(cat["tz_mean"]) if has_tilt else None,
        "tilt_mae_deg_inplane_from_O": mae(cat["tz_O"]), "tilt_mae_deg_inplane_from_O_zero": mae(cat["tz_O_truth"]),
        "tilt_mae_deg_inplane_from_O_gaussian_fit": mae(cat["tz_O_fit"]),
        "tilt_mae_deg_inplane_from_O_gaussian_fit_zero": mae(cat["tz_O_fit_truth"]),
        "tilt_mae_deg_out_of_plane": mae(cat["txy"]) if has_tilt else None,
        "tilt_mae_deg_out_of_plane_zero": mae(cat["txy0"]),
        "tilt_mae_deg_out_of_plane_mean": mae(cat["txy_mean"]) if has_tilt else None,
        "tilt_mean_target_deg": mean_tilt.tolist() if has_tilt else None,
        # B and O: the A columns are the frame (their truth is 0 without A-site polarisation)
        "coverage_1sigma": mean(np.concatenate([cat["z1"], cat["z2"]])),
        "coverage_1sigma_all_columns": mean(np.concatenate([cat["z0"], cat["z1"], cat["z2"]])),
        "coverage_1sigma_per_sublattice": {name: mean(cat[f"z{i}"]) for i, name in enumerate("ABO")},
        "seam_ratio": float(np.mean(cat["border"]) / np.mean(cat["inner"])) if len(cat["border"]) and len(cat["inner"]) else None,
        "variance_scale": dict(zip(SUBLATTICES, variance_scales(uncertainty).tolist())),
        "imperfections": dict(imperfections, thickness_cells=rows[0]["thickness_cells"] if rows else None,
                              dose_e_per_ang2=rows[0]["dose_e_per_ang2"] if rows else None,
                              phonon_configs=phonon_configs),
        "micrographs": rows,
        "notes": ("tilt: per B column, the network's tilt head (about z: inplane; about x and y: out_of_plane) "
                  "against the truth of the specimen by the labels' rule (simulation.labels.tilt_map), the zero "
                  "baseline the mean |truth|, the mean baseline the training split's mean |tilt| per axis (a "
                  "constant: what a head that ignores its input comes closest to); inplane_from_O: the estimate from the O displacements against the "
                  "same rule on the true O columns (_gaussian_fit: from the O columns' fitted positions, on the "
                  "cells whose four O columns were all fitted; its _zero on those cells)" if has_tilt else
                  "the run predicts no tilt head: tilt_mae_deg_inplane is the estimate from the O displacements, "
                  "tilt_mae_deg_out_of_plane None against the zero baseline of the specimens' out-of-plane tilts"),
    }
    net, fit = result["dxdy_rmse_pm_network"], result["dxdy_rmse_pm_gaussian_fit"]
    result["ratio_network_vs_gaussian_fit"] = net / fit if net is not None and fit else None
    if has_tilt and result["tilt_mae_deg_out_of_plane"] is not None and result["tilt_mae_deg_out_of_plane_zero"]:
        result["ratio_out_of_plane_vs_zero"] = result["tilt_mae_deg_out_of_plane"] / result["tilt_mae_deg_out_of_plane_zero"]
    return result


def _slope(estimate: np.ndarray, truth: np.ndarray) -> Optional[float]:
    """Least-squares slope of ``estimate`` on ``truth`` through 0: 1 reads the shifts in full,
    0.5 half of them (shrinkage towards 0)."""
    norm = float(np.sum(np.square(truth)))
    return float(np.sum(estimate * truth) / norm) if norm > 0 else None


def write(result: dict, path) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
