"""Module for the reconstruction driver: run folder in, checked inputs, outputs written."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from stemnet import __version__
from stemnet.errors import UserError, argument
from stemnet.reconstruct.columns import SUBLATTICES, a_brighter, column_statistics, find_lattice_columns
from stemnet.reconstruct.ensemble import keras_predictor, tta_members
from stemnet.reconstruct.lattice import Lattice, check_lattice
from stemnet.reconstruct.micrograph import Micrograph, load_micrograph
from stemnet.reconstruct.outputs import Reconstruction, write_columns_csv, write_hspy
from stemnet.reconstruct.preprocess import (CLIP_PERCENTILES, COARSER_LIMIT, INTENSITY_RULES, check_sampling,
                                            clip_outliers, match_intensity, resample)
from stemnet.reconstruct.tiling import Predictor
from stemnet.train.rundata import RunData

MIN_CELLS = 2  # smallest image, per axis, in unit cells
UNCERTAINTY = "uncertainty.json"  # in the run folder: the calibrated variance scale


def load_uncertainty(run) -> dict:
    """The run's uncertainty calibration (``RUN/uncertainty.json``), or {} if not calibrated."""
    path = Path(run) / UNCERTAINTY
    return json.loads(path.read_text()) if path.is_file() else {}


def variance_scales(uncertainty: dict) -> np.ndarray:
    """The factors on the ensemble spread of the A, B and O columns: the calibration's per
    sublattice, else its single scale, else 1."""
    per = uncertainty.get("variance_scale_per_sublattice")
    if per:
        return np.array([float(per[name]) for name in SUBLATTICES])
    return np.full(len(SUBLATTICES), float(uncertainty.get("variance_scale", 1.0)))


def run_info(run) -> Tuple[dict, dict]:
    """``data.json`` and ``normalization.json`` of a run, checked for reconstruction."""
    run = Path(run)
    for name in ("data.json", "normalization.json", "config.yaml", "export/weights.h5"):
        if not (run / name).is_file():
            raise UserError(f"{run}: not a finished run folder ({name} missing; expected an exported model "
                            "from `stemnet train`)")
    info = RunData.read(run / "data.json").model_dump(mode="json")
    norm = json.loads((run / "normalization.json").read_text())
    if info.get("input_field") != "stem":
        raise UserError(f"{run}: the model was trained on {info.get('input_field')!r} inputs; reconstruct reads "
                        "STEM detector images, expected a run trained on 'stem' data")
    if not info.get("pixel_size_ang"):
        raise UserError(f"{run}/data.json: no pixel_size_ang; expected the training sampling in Å")
    return info, norm


@dataclass
class Prepared:
    """A micrograph checked and brought to the run: everything computed before the model."""

    raw: np.ndarray  # (C, H, W) clipped, resampled to the run's sampling
    x: np.ndarray  # (H, W, C) network input
    columns: Dict[str, np.ndarray]  # found on the native image, in its pixels
    lattice: Optional[Lattice]
    lattice_check: dict
    column_pixel_ang: float  # pixel size of the image the columns were found on [Å]


def _column_images(micrograph: Micrograph, clipped: np.ndarray, raw: np.ndarray):
    """The image columns are found on (bright columns), its ABF partner (or None), and its pixel size."""
    channels = micrograph.channels
    py, px = micrograph.pixel_size_ang
    square = abs(py / px - 1) < 1e-3
    source, pixel = (clipped, py) if square else (raw, None)
    if "haadf" in channels:
        image = source[channels.index("haadf")]
    elif any("adf" in c for c in channels):
        image = source[next(i for i, c in enumerate(channels) if "adf" in c)]
    else:  # bright-field images show columns dark
        image = -source[0]
    abf = source[channels.index("abf")] if "abf" in channels and image is not None else None
    return image, (abf if abf is not None and any("adf" in c for c in channels) else None), pixel


def prepare(micrograph: Micrograph, info: dict, norm, *, intensity: str = "match", force: bool = False) -> Prepared:
    """Every check and every computation that needs no model: sampling policy, size,
    clipping, resampling, intensity matching, columns and the lattice check."""
    p = float(info["pixel_size_ang"])
    where = micrograph.sources[0]["file"] if micrograph.sources else micrograph.name
    check_sampling(micrograph.pixel_size_ang, p, where, info.get("nyquist_step_ang"))
    a_max = max([float(m["a"]) for m in (info.get("materials") or {}).values() if m.get("a")] or [3.9])
    extent = [n * q for n, q in zip(micrograph.data.shape[1:], micrograph.pixel_size_ang)]
    if min(extent) < MIN_CELLS * a_max:
        raise UserError(f"{where}: the image covers {extent[0]:.1f}×{extent[1]:.1f} Å; expected at least "
                        f"{MIN_CELLS} unit cells ({MIN_CELLS * a_max:.1f} Å) along each axis")
    clipped = clip_outliers(micrograph.data)
    raw = resample(clipped, micrograph.pixel_size_ang, p, info.get("nyquist_step_ang"))
    x = match_intensity(raw, norm, intensity, where)
    image, abf, pixel = _column_images(micrograph, clipped, raw)
    pixel = pixel or p
    found, lattice = find_lattice_columns(image, a_is_brighter=a_brighter(info), abf=abf)
    check = check_lattice(lattice, pixel, info, where, force=force)
    return Prepared(raw, x, found, lattice, check, pixel)


def reconstruct(predict: Predictor, micrograph: Micrograph, info: dict, norm, *, intensity: str = "match",
                tile: Optional[Tuple[int, int]] = "auto", tta: bool = True, batch_size: int = 64,
                progress: bool = False, prepared: Optional[Prepared] = None, force: bool = False,
                uncertainty: Optional[dict] = None) -> Reconstruction:
    """Reconstruct one micrograph with ``predict`` (see :func:`keras_predictor`).

    ``tile``: ``"auto"`` (the run's input size), ``(th, tw)``, or None (one pass over the
    whole image, for models that take any size). ``prepared``: :func:`prepare`'s result if
    already computed. ``uncertainty``: the run's calibration (:func:`load_uncertainty`).
    """
    prep = prepared if prepared is not None else prepare(micrograph, info, norm, intensity=intensity, force=force)
    if tile == "auto":
        tile = tuple(info["input_shape"][:2])
    t0 = time.perf_counter()
    members = tta_members(predict, prep.x, tile, tta=tta, batch_size=batch_size, progress=progress)
    members = [norm.denormalize(m) for m in members]
    maps = {k: np.mean([m[k] for m in members], axis=0) for k in members[0]}
    spread = {k: np.std([m[k] for m in members], axis=0) for k in members[0]}
    seconds = time.perf_counter() - t0
    p = float(info["pixel_size_ang"])
    uncertainty = uncertainty or {}
    scales = variance_scales(uncertainty)
    columns, summary = column_statistics(prep.columns, prep.lattice, prep.column_pixel_ang, maps, spread, p, scales,
                                         float(uncertainty.get("tilt_variance_scale", 1.0)))
    summary.update({"fov_ang": [prep.raw.shape[1] * p, prep.raw.shape[2] * p], "shape": list(prep.raw.shape[1:]),
                    "seconds": seconds, "tta_members": len(members), "lattice_check": prep.lattice_check,
                    "forced": bool(prep.lattice_check.get("forced"))})
    if "displacement" in spread and "dx_ang" in columns and len(columns["dx_ang"]):
        raw = np.stack([columns[f"std_{c}_ang"] for c in ("dx", "dy")]) / scales[columns["sublattice"]]
        spread_here = float(np.median(raw))
        summary["ensemble_spread_ang"] = spread_here
        if uncertainty.get("val_spread_ang"):
            summary["spread_vs_validation"] = spread_here / float(uncertainty["val_spread_ang"])
    return Reconstruction(micrograph.name, p, prep.raw, maps, spread, columns, summary)


def _provenance(run: Path, micrograph: Micrograph, info: dict, norm_dict: dict, *, intensity: str, tile,
                tta: bool, lattice_check: dict, uncertainty: dict) -> dict:
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    return {
        "stemnet_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(run.resolve()),
        "run_config": config,
        "data_info": info,
        "normalization": norm_dict,
        "inputs": micrograph.sources,
        "channels": micrograph.channels,
        "input_pixel_size_ang": list(micrograph.pixel_size_ang),
        "calibration": micrograph.calibration,
        "pixel_size_ang": float(info["pixel_size_ang"]),
        "filled_nonfinite_pixels": micrograph.filled,
        "clip_percentiles": list(CLIP_PERCENTILES),
        "resampling": "Gaussian anti-alias sigma=(p_out/p_in-1)/2 px when shrinking, then cubic B-spline "
                      "(scipy.ndimage.map_coordinates order 3, reflect) at pixel centres (j+1/2)*p_out",
        "intensity_rule": intensity if intensity == "raw" else
        "match: x' = mu_train + sigma_train * (x - mean(x)) / std(x) per channel, then the run's normalisation",
        "tile": list(tile) if tile else "whole image",
        "tile_stride": "a quarter tile: every pixel under 4 tiles per axis",
        "window": "sin^2(pi (k + 1/2) / T), separable, normalised by the summed weights",
        "tta": "8 symmetries of the square, mean and std (ddof 0)" if tta else "none",
        "sampling_policy": f"finer: anti-alias downsampled (any factor); coarser than {COARSER_LIMIT} x the run's "
                           "sampling: refused",
        "peak_finder": "skimage.feature.peak_local_max on the column image smoothed by 0.05 a, >= 0.3 a apart",
        "column_fit": "2-D Gaussian + background, scipy.optimize.least_squares, disk of 0.3 a (O on -ABF: 0.2 a)",
        "lattice": "two shortest reciprocal vectors of the Hann-windowed spectrum, refined on the A columns",
        "lattice_check": lattice_check,
        "forced": bool(lattice_check.get("forced")),
        "uncertainty": uncertainty or "not calibrated (8-symmetry spread as is)",
    }


def format_summary(rec: Reconstruction, path: Optional[Path] = None) -> str:
    """The one-line summary of a reconstruction."""
    s = rec.summary
    fy, fx = s["fov_ang"]
    parts = [f"{rec.name}: {fx:.1f}×{fy:.1f} Å at {rec.pixel_size_ang:.3f} Å/px",
             "columns " + ", ".join(f"{n} {s[n]['count']}" for n in SUBLATTICES)]
    if "mean_abs_d_ang" in s.get("A", {}):
        parts.append("mean |d| " + ", ".join(f"{n} {s[n]['mean_abs_d_ang']:.3f}" for n in SUBLATTICES) + " Å")
    if s.get("mean_pol_net_x_pm") is not None:
        parts.append(f"polarisation ({s['mean_pol_net_x_pm']:.1f}, {s['mean_pol_net_y_pm']:.1f}) pm")
    if s.get("tilt_deg") is not None:
        parts.append(f"tilt {s['tilt_deg']:.1f}° ± {s['tilt_spread_deg']:.1f}°")
    if s.get("spread_vs_validation") is not None:
        parts.append(f"spread {s['spread_vs_validation']:.1f}× validation")
    if s.get("forced"):
        parts.append("FORCED: " + s["lattice_check"].get("problem", ""))
    line = "; ".join(parts)
    return line + (f" -> {path}" if path is not None else "")


def reconstruct_files(run, inputs: Sequence = (), out=None, *, channels: Optional[Union[str, Mapping]] = None,
                      dataset: Optional[str] = None, pixel_size: Optional[float] = None, fill_nan: bool = False,
                      intensity: str = "match", tta: bool = True, batch_size: int = 64, plot: bool = True,
                      progress: bool = False, force: bool = False) -> List[Tuple[Reconstruction, Path]]:
    """Reconstruct each input (or the one ``channels`` field of view) with RUN's model and
    write ``OUT/<name>.hspy``, ``OUT/<name>_columns.csv`` (+ ``.png``). Every input is
    read and checked (calibration, sampling, size, lattice) before the model is loaded
    and before anything is written; ``force`` reconstructs a lattice the run never saw.

    Returns ``[(reconstruction, hspy_path), ...]``.
    """
    from stemnet.data import Normalization

    run = Path(run)
    if out is None:
        raise UserError(f"{argument('out')}: expected an output folder")
    if intensity not in INTENSITY_RULES:
        raise UserError(f"{argument('intensity')} {intensity!r}: expected one of {list(INTENSITY_RULES)}")
    if channels is not None and len(inputs):
        raise UserError(f"give {argument('inputs')} or {argument('channels')} NAME=FILE,..., not both")
    if channels is None and not len(inputs):
        raise UserError(f"no input: give {argument('inputs')}, or {argument('channels')} NAME=FILE,... for one file per channel")
    info, norm_dict = run_info(run)
    norm = Normalization.from_dict(norm_dict)
    run_channels = [c.lower() for c in info.get("input_channels") or []]
    if len(run_channels) != int(info["input_shape"][2]):
        raise UserError(f"{run}/data.json: input_channels {run_channels} do not match "
                        f"input_shape {info['input_shape']}")
    sources = [channels] if channels is not None else list(inputs)
    prepared = []
    for source in sources:
        micrograph = load_micrograph(source, run_channels, dataset=dataset, pixel_size=pixel_size,
                                     fill_nan=fill_nan)
        prepared.append((micrograph, prepare(micrograph, info, norm, intensity=intensity, force=force)))  # checks first
    names = [m.name for m, _ in prepared]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"inputs {duplicates}: two inputs would write the same {duplicates[0]}.hspy; "
                        f"reconstruct them into different {argument('out')} folders")
    out = Path(out)
    uncertainty = load_uncertainty(run)
    from stemnet.reconstruct.figures import plot_reconstruction
    from stemnet.train.run import load_run

    model, _, _, _ = load_run(run)
    predict = keras_predictor(model, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for micrograph, arrays in prepared:
        rec = reconstruct(predict, micrograph, info, norm, intensity=intensity, tta=tta, batch_size=batch_size,
                          progress=progress, prepared=arrays, uncertainty=uncertainty)
        rec.provenance = _provenance(run, micrograph, info, norm_dict, intensity=intensity,
                                     tile=tuple(info["input_shape"][:2]), tta=tta,
                                     lattice_check=arrays.lattice_check, uncertainty=uncertainty)
        path = out / f"{micrograph.name}.hspy"
        write_hspy(path, rec)
        write_columns_csv(out / f"{micrograph.name}_columns.csv", rec.columns)
        if plot:
            plot_reconstruction(out / f"{micrograph.name}.png", rec)
        results.append((rec, path))
    return results

