"""Module for calibrating the ensemble uncertainty of a run on held-out simulations.

The spread of the eight symmetry members alone is not a calibrated standard
deviation. :func:`calibrate_uncertainty` runs the ensemble over a split (``val``) of the
run's dataset and finds the variance scale ``s`` such that ``|truth − mean| ≤ s·σ`` for
68.3 % of the in-plane column displacements (and of the tilt angles, when predicted,
with their own scale); it writes ``RUN/uncertainty.json``, which reconstruction reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import numpy as np

from stemnet.errors import UserError
from stemnet.reconstruct.ensemble import keras_predictor, tta_members

ONE_SIGMA = 0.6827
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
    from stemnet.shards import ShardReader, read_manifest, simulation_section
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
                if "tilt" in members[0] and "tilt" in sample:
                    t = np.moveaxis(np.asarray(sample["tilt"], np.float64), 0, -1)
                    m = np.mean([k["tilt"] for k in members], axis=0)
                    s = np.std([k["tilt"] for k in members], axis=0)
                    on = mask[1]  # one value per cell, read at the B columns
                    for key, arr in (("t", t), ("m", m), ("s", s)):
                        found.setdefault(f"tilt_{key}", []).append(arr[on])
                n += 1
    return {k: np.concatenate([np.ravel(v) for v in vals]) for k, vals in found.items()}


def variance_scale(truth: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """The factor ``s`` with ``|truth − mean| ≤ s·std`` for 68.3 % of the values."""
    ratio = np.abs(truth - mean) / np.maximum(std, 1e-12)
    return float(np.quantile(ratio, ONE_SIGMA))


def calibrate_uncertainty(run, data, split: str = "val", max_samples: int = 64, write: bool = True) -> dict:
    """Variance scale(s) of RUN's ensemble on ``data/split``; written to ``RUN/uncertainty.json``."""
    v = ensemble_on_samples(run, data, split, max_samples)
    result: dict = {"split": split, "data": str(Path(data).resolve()), "method": "8-symmetry spread x variance "
                    "scale fitted for 68.3 % coverage on the split"}
    if "displacement_t" in v:
        t, m, s = v["displacement_t"], v["displacement_m"], v["displacement_s"]
        scale = variance_scale(t, m, s)
        result.update(variance_scale=scale, coverage_raw=coverage(t, m, s), coverage_scaled=coverage(t, m, scale * s),
                      val_spread_ang=float(np.median(s)), values=int(t.size))
    if "tilt_t" in v:
        t, m, s = v["tilt_t"], v["tilt_m"], v["tilt_s"]
        result.update(tilt_variance_scale=variance_scale(t, m, s), tilt_coverage_raw=coverage(t, m, s))
    if write:
        path = Path(run) / "uncertainty.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    return result
