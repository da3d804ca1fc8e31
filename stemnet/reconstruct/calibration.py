"""Module for calibrating the ensemble uncertainty of a run on held-out simulations.

The spread of the eight symmetry members alone is not a calibrated standard
deviation. :func:`calibrate_uncertainty` finds the variance scale ``s`` such that
``|truth − mean| ≤ s·σ`` for 68.3 % of the in-plane column displacements (and of the tilt
magnitudes, when predicted, with their own scale) and writes ``RUN/uncertainty.json``,
which reconstruction reads. It fits either on a split (``val``) of the run's dataset,
sample by sample (:func:`ensemble_on_samples`), or -- ``micrographs=K`` -- on K realistic
micrographs simulated inside the training draws and reconstructed as a user's file is
(:func:`ensemble_on_micrographs`: tiled, blended, phonon-averaged, static truth). The
second matches what reconstruction meets: a 32-pixel training sample holds one frozen
phonon snapshot whose random shifts the static labels do not contain, which inflates the
errors a split sees.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import numpy as np

from stemnet.errors import UserError
from stemnet.reconstruct.columns import SUBLATTICES
from stemnet.reconstruct.ensemble import keras_predictor, tta_members

ONE_SIGMA = 0.6827
MIN_VALUES = 20  # fewest values a sublattice's own variance scale is fitted on
IN_PLANE = [3 * s + c for s in range(3) for c in (0, 1)]  # A/B/O dx, dy


def coverage(truth: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """Fraction of ``truth`` inside ``mean ± std`` (all arrays alike)."""
    truth, mean, std = (np.asarray(a, np.float64).ravel() for a in (truth, mean, std))
    return float(np.mean(np.abs(truth - mean) <= std)) if truth.size else float("nan")


def ensemble_on_samples(run, data, split: str = "val", max_samples: int = 64) -> Dict[str, list]:
    """Truth, ensemble mean and spread at the column centres (mask ≥ 0.5) of up to
    ``max_samples`` samples of ``data/split``: ``{"displacement": [t, m, s], "tilt": ...}``
    with ``(N, K)`` arrays (in-plane displacement channels, Å; tilt, degrees)."""
    from stemnet.data import Normalization
    from stemnet.shards import ShardReader, close_shards, read_manifest, simulation_section
    from stemnet.train.run import load_run
    from stemnet.train.rundata import RunData

    run, data = Path(run), Path(data)
    info = RunData.read(run / "data.json").model_dump(mode="json")
    norm = Normalization.from_dict(json.loads((run / "normalization.json").read_text()))
    manifest = read_manifest(data)
    entries = (manifest.get("splits", {}).get(split) or {}).get("shards", [])
    if not any(e.get("count") for e in entries):
        raise UserError(f"{data}: no {split!r} samples to calibrate the uncertainty on")
    model, _, _, _ = load_run(run)
    predict = keras_predictor(model)
    close_shards(data)  # a training pipeline of this process may hold the shards open
    channels = info.get("input_channels") or []
    names = simulation_section(manifest).detectors or list(channels)
    pick = [names.index(c) for c in channels] if all(c in names for c in channels) else list(range(len(channels)))
    found: Dict[str, list] = {}
    n = 0
    for entry in entries:
        if not entry.get("count") or n >= max_samples:
            continue
        with ShardReader(data / entry["path"]) as reader:
            for _, sample in reader.items():
                if n >= max_samples:
                    break
                x = norm.inputs(np.moveaxis(np.asarray(sample["stem"], np.float32)[pick], 0, -1), channels_last=True)
                members = [norm.denormalize(m) for m in tta_members(predict, x, None)]
                mask = np.asarray(sample["columns"]) >= 0.5  # (3, H, W)
                if "displacement" in members[0]:
                    t = np.moveaxis(np.asarray(sample["displacement"], np.float64), 0, -1)
                    m = np.mean([k["displacement"] for k in members], axis=0)
                    s = np.std([k["displacement"] for k in members], axis=0)
                    for ch in IN_PLANE:
                        on = mask[ch // 3]
                        for key, arr in (("t", t), ("m", m), ("s", s)):
                            found.setdefault(f"displacement_{key}", []).append(arr[..., ch][on])
                        found.setdefault("displacement_sub", []).append(np.full(int(on.sum()), ch // 3))
                if "tilt" in members[0] and "tilt" in sample:
                    t = np.moveaxis(np.asarray(sample["tilt"], np.float64), 0, -1)
                    m = np.mean([k["tilt"] for k in members], axis=0)
                    s = np.std([k["tilt"] for k in members], axis=0)
                    on = mask[1]  # one value per cell, read at the B columns
                    for key, arr in (("t", t), ("m", m), ("s", s)):
                        found.setdefault(f"tilt_{key}", []).append(arr[on])
                n += 1
    return {k: np.concatenate([np.ravel(v) for v in vals]) for k, vals in found.items()}


def ensemble_on_micrographs(run, data, count: int = 2, seed: int = 2027, progress: bool = False) -> Dict[str, list]:
    """Truth, ensemble mean and raw spread of the matched columns of ``count`` realistic
    micrographs inside the training draws (:func:`stemnet.reconstruct.heldout
    .realistic_micrograph` with ``held_out=False``), as :func:`ensemble_on_samples`
    returns them: in-plane displacements (Å) of every column, tilt magnitudes (deg) at the
    B columns."""
    from stemnet.data import Normalization, tilt_target
    from stemnet.reconstruct.heldout import (match_reconstruction, matched_displacements, realistic_micrograph,
                                             truth_tilts)
    from stemnet.reconstruct.pipeline import reconstruct, run_info
    from stemnet.shards import read_manifest
    from stemnet.train.run import load_run

    info, norm_dict = run_info(run)
    norm = Normalization.from_dict(norm_dict)
    sim = read_manifest(data).get("extra", {}).get("simulation")
    if not sim:
        raise UserError(f"{data}/manifest.json: no simulation config to simulate calibration micrographs from")
    model, *_ = load_run(run)
    predict = keras_predictor(model)
    found: Dict[str, list] = {}
    for k in range(count):
        rng = np.random.default_rng([seed, k])  # micrograph k is a function of (seed, k) alone
        spec, micrograph, material, _ = realistic_micrograph(info, sim, rng, held_out=False, name=f"calibration-{k}",
                                                             index=k)
        c = reconstruct(predict, micrograph, info, norm, progress=progress).columns
        truth, matched = match_reconstruction(c, spec, material.a)
        for sub in range(len(SUBLATTICES)):
            arrays = matched_displacements(c, truth, matched, sublattice=sub)
            for key, arr in zip("tms", arrays):
                found.setdefault(f"displacement_{key}", []).append(arr)
            found.setdefault("displacement_sub", []).append(np.full(arrays[0].size, sub))
        if "tilt" in info["targets"]:
            b = np.flatnonzero((c["sublattice"] == 1) & (matched >= 0))
            m = np.column_stack([c[f"tilt_{a}_deg"][b] for a in "xyz"])
            s = np.column_stack([c[f"std_tilt_{a}_deg"][b] for a in "xyz"])
            ok = np.all(np.isfinite(m) & np.isfinite(s), axis=1)
            t = tilt_target(truth_tilts(spec, truth.xy[matched[b[ok]]]))
            for key, arr in (("t", t), ("m", m[ok]), ("s", s[ok])):
                found.setdefault(f"tilt_{key}", []).append(arr)
    return {k: np.concatenate([np.ravel(v) for v in vals]) for k, vals in found.items()}


def variance_scale(truth: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """The factor ``s`` with ``|truth − mean| ≤ s·std`` for 68.3 % of the values."""
    ratio = np.abs(truth - mean) / np.maximum(std, 1e-12)
    return float(np.quantile(ratio, ONE_SIGMA))


def sublattice_scales(truth, mean, std, sublattice, fallback: float) -> Dict[str, float]:
    """:func:`variance_scale` per sublattice (``sublattice``: 0 A, 1 B, 2 O per value); a
    sublattice with fewer than :data:`MIN_VALUES` values takes ``fallback``."""
    return {name: variance_scale(truth[sublattice == k], mean[sublattice == k], std[sublattice == k])
            if np.count_nonzero(sublattice == k) >= MIN_VALUES else float(fallback)
            for k, name in enumerate(SUBLATTICES)}


def calibrate_uncertainty(run, data, split: str = "val", max_samples: int = 64, write: bool = True, *,
                          micrographs: int = 0, seed: int = 2027, progress: bool = False) -> dict:
    """Variance scale(s) of RUN's ensemble on ``data/split`` or, with ``micrographs`` > 0, on
    that many realistic micrographs inside the training draws (the split still gives the
    reference spread, ``val_spread_ang``); written to ``RUN/uncertainty.json``."""
    v = ensemble_on_samples(run, data, split, max_samples)
    result: dict = {"split": split, "data": str(Path(data).resolve()), "method": "8-symmetry spread x variance "
                    "scale fitted for 68.3 % coverage on the split"}
    if "displacement_t" in v:
        result.update(val_spread_ang=float(np.median(v["displacement_s"])))
    if micrographs:
        result["split_coverage_raw"] = coverage(v["displacement_t"], v["displacement_m"], v["displacement_s"]) \
            if "displacement_t" in v else None
        v = ensemble_on_micrographs(run, data, micrographs, seed, progress)
        result.update(micrographs=int(micrographs), seed=int(seed), method="8-symmetry spread x variance scale "
                      "fitted for 68.3 % coverage on realistic micrographs inside the training draws")
    if "displacement_t" in v:
        t, m, s = v["displacement_t"], v["displacement_m"], v["displacement_s"]
        scale = variance_scale(t, m, s)
        result.update(variance_scale=scale, coverage_raw=coverage(t, m, s), coverage_scaled=coverage(t, m, scale * s),
                      values=int(t.size))
        if "displacement_sub" in v:  # the sublattices' spreads relate differently to their errors
            sub = v["displacement_sub"]
            per = sublattice_scales(t, m, s, sub, scale)
            result["variance_scale_per_sublattice"] = per
            result["coverage_scaled_per_sublattice"] = {
                name: coverage(t[sub == k], m[sub == k], per[name] * s[sub == k]) if np.any(sub == k) else None
                for k, name in enumerate(SUBLATTICES)}
    if "tilt_t" in v:
        t, m, s = v["tilt_t"], v["tilt_m"], v["tilt_s"]
        result.update(tilt_variance_scale=variance_scale(t, m, s), tilt_coverage_raw=coverage(t, m, s))
    if write:
        path = Path(run) / "uncertainty.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    return result
