"""The end-to-end demo: simulate → train → evaluate → reconstruct → ``demo/REPORT.md``.

Each stage reuses what a previous run left (the generator resumes, a finished run is
not retrained), so a rerun only redoes what is missing. ``tiny=True`` runs the same
pipeline on the test-suite configs in about a minute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stemnet.log import get_logger
from stemnet.shipped import shipped_config, shipped_dir

log = get_logger("demo")
REPO = Path(__file__).resolve().parents[1]
MICROGRAPH = shipped_dir("micrograph")  # the shipped HAADF/ABF pair with its truth


def _configs(tiny: bool):
    from simulation.config import load_simulation
    from stemnet.config import load_config

    if tiny:
        # the demo's three targets (tilt labels and a tilt head) on the test suite's tiny data
        sim = load_simulation(shipped_config("simulation/tiny_stem"), ["simulation.tilt_labels=true"])
        train = load_config(shipped_config("training/tiny"), [
            "train.steps=60", "train.val_every=30", "data.targets=[potential, displacement, tilt]",
            "model.heads={potential: 1, displacement: 9, tilt: 3}",
            "train.head_weights={potential: 1.0, displacement: 1.0, tilt: 1.0}"], require=("model", "train"))
    else:
        sim = load_simulation(shipped_config("simulation/demo"))
        train = load_config(shipped_config("training/demo"), require=("model", "train"))
    return sim, train


def _finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("finished", False)


def specimen_xy(x_ang, y_ang, positions_ang, pixel_ang: float) -> np.ndarray:
    """Where in the specimen (Å, x and y) the probe was at image points ``x_ang, y_ang``
    (Å from the image corner, the column table's frame): the recorded probe positions
    ``positions_ang`` (H, W, 2) of the micrograph's truth, bilinear between pixel centres
    (they carry the scan's drift, jitter and flyback)."""
    from scipy import ndimage

    rc = np.stack([np.asarray(y_ang, float) / pixel_ang - 0.5, np.asarray(x_ang, float) / pixel_ang - 0.5])
    return np.column_stack([ndimage.map_coordinates(np.asarray(positions_ang[..., k], np.float64), rc, order=1,
                                                    mode="nearest") for k in range(2)])


def compare_with_truth(rec, micrograph: Path = MICROGRAPH) -> dict:
    """The reconstruction of the shipped micrograph against its truth, per column.

    Every column of ``rec.columns`` is placed in the specimen through the recorded probe
    positions (:func:`specimen_xy`) and matched to its true column
    (:func:`stemnet.reconstruct.heldout.match_columns`). Returned: ``values`` (the
    report's numbers) — in-plane displacement RMSE (pm) of the A and B columns for the
    network and the Gaussian-fit baseline (columns the fit found; relative to the A
    lattice), polarisation (B off its A-cell centre, pm) mean and RMSE of network and fit
    against the truth, tilt MAE per axis of the network's tilt head against the truth
    (:func:`~stemnet.reconstruct.heldout.truth_tilts`) and the zero baseline, and the
    rotation about z from the O columns around each B (the network's and the fitted
    positions) against the same rule on the true O columns — and
    ``truth``: the true values per row of the column table (NaN where unmatched)."""
    from simulation.micrograph import realistic_specimen
    from stemnet.data import tilt_target
    from stemnet.reconstruct.heldout import (column_truth, match_columns, truth_polarisation_pm, truth_tilt_z_from_O,
                                             truth_tilts)

    z = np.load(Path(micrograph) / "truth.npz")
    desc = json.loads(str(z["description"]))
    spec = realistic_specimen(desc)
    truth = column_truth(spec)
    box = np.diag(spec.atoms.cell.array)[:2]
    c = rec.columns
    sub = np.asarray(c["sublattice"])
    n = len(sub)
    xy = specimen_xy(c["ideal_x_ang"], c["ideal_y_ang"], z["positions_ang"], float(desc["pixel_size_ang"]))
    matched = match_columns(sub, xy, truth, box, float(desc["a_ang"]))
    m = matched >= 0
    per = {k: np.full(n, np.nan) for k in ("dx_ang", "dy_ang", "pol_x_pm", "pol_y_pm",
                                            "tilt_x_deg", "tilt_y_deg", "tilt_z_deg")}
    per["matched"] = matched
    per["dx_ang"][m], per["dy_ang"][m] = truth.displacement[matched[m], 0], truth.displacement[matched[m], 1]
    b = np.flatnonzero((sub == 1) & m)
    per["pol_x_pm"][b], per["pol_y_pm"][b] = truth_polarisation_pm(truth, matched[b], box).T
    if len(b):
        true_t = tilt_target(truth_tilts(spec, truth.xy[matched[b]]))  # what the head predicts: |angle|
        for k, axis in enumerate("xyz"):
            per[f"tilt_{axis}_deg"][b] = true_t[:, k]

    rms = lambda v: float(100 * np.sqrt(np.mean(np.square(v)))) if np.size(v) else None  # noqa: E731  Å -> pm
    cat = m & (sub < 2) & np.isfinite(c["fit_dx_ang"]) & np.isfinite(c["fit_dy_ang"])
    td = np.column_stack([per["dx_ang"][cat], per["dy_ang"][cat]])
    net = np.column_stack([c["dx_ang"][cat], c["dy_ang"][cat]])
    fit = np.column_stack([c["fit_dx_ang"][cat], c["fit_dy_ang"][cat]])
    values = {"columns": int(n), "columns_matched": int(m.sum()), "columns_scored": int(cat.sum()),
              "dxdy_rmse_pm_network": rms(net - td), "dxdy_rmse_pm_gaussian_fit": rms(fit - td),
              "dxdy_rms_pm_zero": rms(td)}
    true_pol = np.column_stack([per["pol_x_pm"], per["pol_y_pm"]])
    for key, name in (("pol_net", "network"), ("pol_fit", "gaussian_fit")):
        est = np.column_stack([c[f"{key}_x_pm"], c[f"{key}_y_pm"]])
        ok = np.all(np.isfinite(est), 1) & np.all(np.isfinite(true_pol), 1)
        values[f"pol_cells_{name}"] = int(ok.sum())
        values[f"pol_mean_pm_{name}"] = est[ok].mean(0).tolist() if ok.any() else None
        values[f"pol_rmse_pm_{name}"] = rms((est[ok] - true_pol[ok]) / 100) if ok.any() else None
    ok = np.all(np.isfinite(true_pol), 1)
    values["pol_mean_pm_truth"] = true_pol[ok].mean(0).tolist() if ok.any() else None
    values["pol_cells_truth"] = int(ok.sum())
    for axis in "xyz":
        t = per[f"tilt_{axis}_deg"]
        have = np.isfinite(t)
        values[f"tilt_{axis}_mae_deg_zero"] = float(np.mean(np.abs(t[have]))) if have.any() else None
        values[f"tilt_{axis}_mean_deg_truth"] = float(np.mean(t[have])) if have.any() else None
        key = f"tilt_{axis}_deg"
        if key in c:
            ok = have & np.isfinite(c[key])
            values[f"tilt_{axis}_mae_deg_network"] = float(np.mean(np.abs(c[key][ok] - t[ok]))) if ok.any() else None
            values[f"tilt_{axis}_cells"] = int(ok.sum())
        else:
            values[f"tilt_{axis}_mae_deg_network"] = None
            values[f"tilt_{axis}_cells"] = 0
    # the tilt about z from the four O columns around each B (network's and fitted positions)
    # against the same rule on the true O columns
    from_o = truth_tilt_z_from_O(truth.xy, truth.sublattice, truth.displacement, float(desc["a_ang"]), box)
    per["tilt_z_deg_from_O"] = np.full(n, np.nan)
    for i in b:
        per["tilt_z_deg_from_O"][i] = from_o.get(int(matched[i]), np.nan)
    t = per["tilt_z_deg_from_O"]
    values["tilt_z_from_O_mae_deg_zero"] = float(np.nanmean(np.abs(t))) if np.isfinite(t).any() else None
    for key, name in (("tilt_z_deg_from_O", "network"), ("tilt_z_deg_from_O_fit", "gaussian_fit")):
        ok = np.isfinite(t) & np.isfinite(c[key]) if key in c else np.zeros(n, bool)
        values[f"tilt_z_from_O_mae_deg_{name}"] = float(np.mean(np.abs(c[key][ok] - t[ok]))) if ok.any() else None
        values[f"tilt_z_from_O_cells_{name}"] = int(ok.sum())
    return {"values": values, "truth": per, "description": desc}


def run_demo(root: Path = REPO / "demo", *, tiny: bool = False, workers: int = 2, progress: bool = True) -> Path:
    """Run (or resume) the demo under ``root``; returns the path of REPORT.md."""
    from simulation.generator import generate
    from stemnet.data import close_shards
    from stemnet.evaluate import evaluate, format_table
    from stemnet.reconstruct import calibrate_uncertainty, reconstruct_files
    from stemnet.reconstruct.figures import plot_truth_comparison
    from stemnet.stage import plot_samples
    from stemnet.train.loop import train

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sim_cfg, train_cfg = _configs(tiny)
    data, run, figures = root / "data", root / "run", root / "figures"
    figures.mkdir(exist_ok=True)
    times = {}

    t0 = time.perf_counter()
    close_shards(data)  # the data pipeline keeps shards open per process; the generator reopens them
    sim = generate(sim_cfg, data, workers=workers, progress=progress)
    times["simulate"] = time.perf_counter() - t0
    log.info("demo: %d samples simulated (%d new)", sim_cfg.num_samples, sim["written"])
    plot_samples(data, figures / "samples.png", n=3)

    t0 = time.perf_counter()
    if not _finished(run):
        train(train_cfg, data, run, progress=progress)
    times["train"] = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())

    t0 = time.perf_counter()
    evaluation = evaluate(run, data, "test", plot=figures / "evaluate.png")
    (root / "evaluate.json").write_text(json.dumps(evaluation, indent=1) + "\n")
    close_shards(data)
    times["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not (run / "uncertainty.json").exists():  # the ensemble spread alone is not a calibrated σ
        calibrate_uncertainty(run, data, "val")
        close_shards(data)
    times["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    channels = {name: MICROGRAPH / f"{name}.hspy" for name in ("haadf", "abf")}
    (rec, hspy), = reconstruct_files(run, channels=channels, out=root / "reconstruction")  # native calibration
    comparison = compare_with_truth(rec)
    (root / "comparison.json").write_text(json.dumps(comparison["values"], indent=1) + "\n")
    plot_truth_comparison(figures / "truth.png", rec, {k: v for k, v in comparison["truth"].items()
                                                        if k.startswith(("pol_", "tilt_"))})
    times["reconstruct"] = time.perf_counter() - t0

    report = root / "REPORT.md"
    report.write_text(_report(sim_cfg, train_cfg, summary, evaluation, format_table(evaluation), rec, hspy,
                              comparison, times, tiny))
    return report


def _num(value, spec: str = ".1f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _vec(v) -> str:
    return "n/a" if v is None else f"({_num(v[0])}, {_num(v[1])})"


def _micrograph_text(d: dict, rec, sim_cfg) -> str:
    imp = d["imperfections"]
    lat = d["lattice_ang"]
    return (f"`demo/micrograph/haadf.hspy` + `abf.hspy` (also as NCEM `.emd`), reconstructed at their own "
            f"calibration: {d['material']} [001], {d['pixels']}×{d['pixels']} pixels of {d['pixel_size_ang']:g} Å "
            f"({d['pixels'] * d['pixel_size_ang']:.1f} Å field of view), {d['thickness_cells']} cells thick, Glazer "
            f"{d['glazer']} ({', '.join(f'{t:g}' for t in d['tilt_deg'])})°, B shifted "
            f"({', '.join(f'{100 * v:g}' for v in d['polar_B_ang'])}) pm, lattice {lat[0]:.3f} × {lat[1]:.3f} Å; "
            f"source {imp['source_fwhm_ang']:g} Å FWHM, focal spread {imp['focal_spread_ang']:g} Å, drift "
            f"({imp['drift_x_ang_per_line']:g}, {imp['drift_y_ang_per_line']:g}) Å/line, jitter "
            f"{imp['jitter_ang']:g} Å, dose {imp['dose_e_per_ang2']:g} e/Å², gain {imp['gain']:g} — every "
            "imperfection outside the training draws (values and ranges: `demo/micrograph/README.md`). "
            f"Reconstruction at {rec.pixel_size_ang:.3f} Å map pixels: {rec.summary.get('columns', '?')} columns "
            f"found; {_lattice_text(rec.summary.get('lattice_check') or {})}.")


def _lattice_text(check: dict) -> str:
    if not check.get("measured"):
        return "lattice not measured"
    lengths = " × ".join(f"{v:.3f}" for v in check["lengths_ang"])
    verdict = "FORCED: " + check["problem"] if check.get("forced") else "inside the trained lattices (±5 %, square)"
    return f"lattice check: measured {lengths} Å at {check['angle_deg']:.1f}°, {verdict}"


def _comparison_table(v: dict) -> str:
    f2 = lambda x: _num(x, ".2f")  # noqa: E731
    rows = [
        "| per column / per cell | network | Gaussian fit | zero baseline | truth |",
        "|---|---|---|---|---|",
        f"| in-plane displacement RMSE, A and B columns (pm; {v['columns_scored']} columns) | "
        f"{f2(v['dxdy_rmse_pm_network'])} | {f2(v['dxdy_rmse_pm_gaussian_fit'])} | {f2(v['dxdy_rms_pm_zero'])} | 0 |",
        f"| polarisation, mean (pm; B off its A-cell centre) | {_vec(v['pol_mean_pm_network'])} | "
        f"{_vec(v['pol_mean_pm_gaussian_fit'])} | (0, 0) | {_vec(v['pol_mean_pm_truth'])} |",
        f"| polarisation RMSE per cell (pm; {v['pol_cells_network']} cells) | {f2(v['pol_rmse_pm_network'])} | "
        f"{f2(v['pol_rmse_pm_gaussian_fit'])} | — | 0 |",
    ]
    for axis in "xyz":
        rows.append(f"| tilt about {axis}, MAE per cell (°; {v[f'tilt_{axis}_cells']} cells) | "
                    f"{f2(v[f'tilt_{axis}_mae_deg_network'])} | — | {f2(v[f'tilt_{axis}_mae_deg_zero'])} | "
                    f"mean {f2(v[f'tilt_{axis}_mean_deg_truth'])} |")
    if v.get("tilt_z_from_O_cells_network") or v.get("tilt_z_from_O_cells_gaussian_fit"):
        rows.append(f"| tilt from the O columns, about z: the four around each B, MAE (°; "
                    f"{v['tilt_z_from_O_cells_network']} / {v['tilt_z_from_O_cells_gaussian_fit']} cells) | "
                    f"{f2(v['tilt_z_from_O_mae_deg_network'])} | {f2(v['tilt_z_from_O_mae_deg_gaussian_fit'])} | "
                    f"{f2(v['tilt_z_from_O_mae_deg_zero'])} | signed, from the true O columns |")
    return "\n".join(rows)


def _report(sim_cfg, train_cfg, summary, evaluation, table, rec, hspy, comparison, times, tiny) -> str:
    m = evaluation["metrics"]
    rows = "\n".join(f"| {k} | {v:.1f} s |" for k, v in times.items())
    png = hspy.with_suffix(".png")
    lines = [
        "# stemnet demo report" + (" (tiny configuration)" if tiny else ""),
        "",
        f"Simulated {sim_cfg.num_samples} {sim_cfg.mode.upper()} samples "
        f"({', '.join(sim_cfg.specimen.materials)}; Glazer {', '.join(sim_cfg.distortion.glazer)}), "
        f"trained the FC-DenseNet for {summary['steps']} steps ({summary['samples_per_s']:.0f} samples/s), "
        f"evaluated it on the {evaluation['samples']} test samples, calibrated its ensemble uncertainty on the "
        "val split (`RUN/uncertainty.json`), and reconstructed the shipped micrograph "
        "at its native calibration (a specimen, thickness and instrument the model never saw, at a finer "
        "pixel size and a larger field of view).",
        "",
        "## Time",
        "",
        "| stage | time |",
        "|---|---|",
        rows,
        f"| **total** | **{sum(times.values()):.1f} s** |",
        "",
        "## Test split: model and baselines",
        "",
        "```",
        table,
        "```",
        "",
        f"Displacement RMSE at column sites: model {m['model']['displacement_rmse_all_ang']:.4f} Å vs zero "
        f"baseline {m['zero']['displacement_rmse_all_ang']:.4f} Å "
        f"(ratio {m['model']['displacement_rmse_all_ang'] / m['zero']['displacement_rmse_all_ang']:.2f}); "
        f"potential R² {m['model']['potential_r2']:.3f}.",
        "",
        "![inputs, truth, prediction, error](figures/evaluate.png)",
        "",
        "## The shipped micrograph",
        "",
        _micrograph_text(comparison["description"], rec, sim_cfg),
        "",
        _comparison_table(comparison["values"]),
        "",
        "Network (top) and truth (bottom): polarisation vectors on the image (same arrow scale) and the "
        "per-cell tilt maps about x, y and z (same colour range).",
        "",
        "![network and truth](figures/truth.png)",
        "",
        f"The reconstruction's own figure (image with network and Gaussian-fit polarisation, tilt maps, "
        f"potential, uncertainty):",
        "",
        f"![reconstruction]({png.relative_to(png.parents[1])})",
        "",
        "## Training samples",
        "",
        "![samples](figures/samples.png)",
        "",
    ]
    return "\n".join(lines)
