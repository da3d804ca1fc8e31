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
        sim = load_simulation(shipped_config("simulation/tiny_stem"))
        train = load_config(shipped_config("training/tiny"), ["train.steps=60", "train.val_every=30"],
                            require=("model", "train"))
    else:
        sim = load_simulation(shipped_config("simulation/demo"))
        train = load_config(shipped_config("training/demo"), require=("model", "train"))
    return sim, train


def _finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("finished", False)


def compare_with_truth(rec) -> dict:
    """Displacement RMSE (Å) of a reconstruction of the shipped micrograph at the true
    column sites, against the zero baseline, and the tilt about the beam."""
    from simulation.micrograph import truth_on_grid
    from stemnet.evaluate import score

    disp = rec.maps["displacement"]
    truth = truth_on_grid(disp.shape[:2], rec.pixel_size_ang)
    t = {"displacement": truth["displacement"][None], "displacement_mask": truth["displacement_mask"][None]}
    a = np.array([truth["a_ang"]])
    model = score(t, {"displacement": disp[None]}, a)
    zero = score(t, {"displacement": np.zeros_like(disp)[None]}, a)
    from simulation.micrograph import SPECIMEN

    b = SPECIMEN["polar_B_ang"]
    description = (f"SrTiO3 [001], Glazer {SPECIMEN['glazer']} {truth['tilt_deg']:.0f}°, Ti shifted "
                   f"({b[0]:.2f}, {b[1]:.2f}) Å, 4×4 cells, {rec.pixel_size_ang:.3f} Å map pixels, Poisson noise.")
    return {"description": description, "model_rmse_ang": model["displacement_rmse_ang"], "model_rmse_all_ang": model["displacement_rmse_all_ang"],
            "zero_rmse_all_ang": zero["displacement_rmse_all_ang"], "true_tilt_deg": truth["tilt_deg"],
            "tilt_error_deg": model["tilt_mae_deg"]}


def run_demo(root: Path = REPO / "demo", *, tiny: bool = False, workers: int = 2, progress: bool = True) -> Path:
    """Run (or resume) the demo under ``root``; returns the path of REPORT.md."""
    from simulation.generator import generate
    from stemnet.data import close_shards
    from stemnet.evaluate import evaluate, format_table
    from stemnet.reconstruct import reconstruct_files
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
    channels = {name: MICROGRAPH / f"{name}.hspy" for name in ("haadf", "abf")}
    (rec, hspy), = reconstruct_files(run, channels=channels, out=root / "reconstruction")
    comparison = compare_with_truth(rec)
    times["reconstruct"] = time.perf_counter() - t0

    report = root / "REPORT.md"
    report.write_text(_report(sim_cfg, train_cfg, summary, evaluation, format_table(evaluation), rec, hspy,
                              comparison, times, tiny))
    return report


def _num(value, spec: str = ".1f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _pair(summary: dict, key: str) -> str:
    return f"({_num(summary.get(f'mean_{key}_x_pm'))}, {_num(summary.get(f'mean_{key}_y_pm'))})"


def _truth_pol() -> str:
    from simulation.micrograph import SPECIMEN

    b = SPECIMEN["polar_B_ang"]
    return f"({100 * b[0]:.1f}, {100 * b[1]:.1f})"


def _report(sim_cfg, train_cfg, summary, evaluation, table, rec, hspy, comparison, times, tiny) -> str:
    m = evaluation["metrics"]
    rows = "\n".join(f"| {k} | {v:.1f} s |" for k, v in times.items())
    per = " · ".join(f"{k} {v:.3f}" for k, v in comparison["model_rmse_ang"].items() if not k.endswith("dz"))
    png = hspy.with_suffix(".png")
    lines = [
        "# stemnet demo report" + (" (tiny configuration)" if tiny else ""),
        "",
        f"Simulated {sim_cfg.num_samples} {sim_cfg.mode.upper()} samples "
        f"({', '.join(sim_cfg.specimen.materials)}; Glazer {', '.join(sim_cfg.distortion.glazer)}), "
        f"trained the FC-DenseNet for {summary['steps']} steps ({summary['samples_per_s']:.0f} samples/s), "
        f"evaluated it on the {evaluation['samples']} test samples, and reconstructed the shipped micrograph "
        "(a specimen the model never saw, at another pixel size and a larger field of view).",
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
        f"`demo/micrograph/haadf.hspy` + `abf.hspy`: {comparison['description']} "
        f"Reconstruction: {rec.summary.get('columns', '?')} columns found; displacement RMSE at the true column "
        f"sites {comparison['model_rmse_all_ang']:.4f} Å vs {comparison['zero_rmse_all_ang']:.4f} Å for the zero "
        f"baseline (per component: {per}).",
        "",
        "| per cell | reconstruction | truth |",
        "|---|---|---|",
        f"| polarisation, network (pm) | {_pair(rec.summary, 'pol_net')} | {_truth_pol()} |",
        f"| polarisation, Gaussian fit (pm) | {_pair(rec.summary, 'pol_fit')} | {_truth_pol()} |",
        f"| tilt about z, mean abs (°) | {_num(rec.summary.get('tilt_deg'))} "
        f"± {_num(rec.summary.get('tilt_spread_deg'))} | {comparison['true_tilt_deg']:.1f} |",
        "",
        f"![reconstruction]({png.relative_to(png.parents[1])})",
        "",
        "## Training samples",
        "",
        "![samples](figures/samples.png)",
        "",
    ]
    return "\n".join(lines)
