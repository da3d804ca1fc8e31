"""Evaluate a trained run on a split, beside the baselines, in physical units.

Metrics
-------
potential (V·Å): R² (1 − SSE/SST over every pixel of the split), PSNR (dB, peak = the
truth's range), SSIM (scikit-image's with that range, uniform 3×3 window: maps are small).

displacement (Å), "at column sites": a label map holds Σ g_c·d_c (Gaussian g_c = 1 at
column c's centre), so near a centre map / mask is the column's displacement. The RMSE
per sublattice and component is taken over the pixels whose mask is ≥ 0.5 (the centre
of each column), of (prediction − truth) / mask.

tilt about the beam axis (degrees), from the O columns that are not B sites: for a
tilt θ about z every such column moves ⊥ to its B–O–B bond by (a/2)·tan θ, so
θ = atan(2·rms|d_xy| / a), per sample; reported as the mean absolute error of θ
recovered from the prediction against θ recovered from the truth.

tilt maps (degrees), when the run predicts them: the mean absolute error of the per-cell
octahedral tilt magnitude (:func:`stemnet.data.tilt_target`) about x, y and z
(``tilt_map_mae_deg_x`` …) over every pixel (the maps are constant over each cell, so this
is the cell-area-weighted mean over cells), and about x and y together
(``tilt_map_mae_deg_out_of_plane``).

Baselines, in the same table: ``zero`` (no displacement; the potential's training mean,
a constant) and ``mean`` (the per-pixel mean maps of the training split); for STEM-image
inputs also ``column-fit`` (classical: each column's intensity centroid on the HAADF image
for A and B and on the inverted ABF image for O, near its ideal site, relative to the A
sublattice → dx, dy; it cannot give dz, nor a potential).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from stemnet.data.layout import COMPONENTS, DISPLACEMENT_CHANNELS, SUBLATTICES, TILT_CHANNELS, displacement_channel
from stemnet.errors import UserError
from stemnet.log import get_logger
from stemnet.reconstruct.peaks import find_peaks

log = get_logger("evaluate")
CENTRE = 0.5  # mask level that marks a column centre
CENTROID_ITERATIONS = 20  # re-centring steps of the column-fit centroid (converges in ~5)


# ------------------------------------------------------------------------- metrics
def r2(truth: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination over all pixels."""
    truth = np.asarray(truth, np.float64)
    sse = np.sum((np.asarray(pred, np.float64) - truth) ** 2)
    sst = np.sum((truth - truth.mean()) ** 2)
    return float(1.0 - sse / sst) if sst > 0 else float("nan")


def psnr(truth: np.ndarray, pred: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB), peak = the truth's range."""
    truth = np.asarray(truth, np.float64)
    mse = np.mean((np.asarray(pred, np.float64) - truth) ** 2)
    peak = truth.max() - truth.min()
    return float(10 * math.log10(peak**2 / mse)) if mse > 0 else float("inf")


def ssim(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean SSIM of (N, H, W, C) maps: scikit-image's, per map and channel, then averaged.

    Data range = the truth's range over all maps; a uniform 3×3 window (the maps are
    small) and population (co)variances, as in Wang et al. (2004).
    """
    from skimage.metrics import structural_similarity

    truth = np.asarray(truth, np.float64)
    pred = np.asarray(pred, np.float64)
    data_range = float(truth.max() - truth.min())
    values = [structural_similarity(truth[i, ..., c], pred[i, ..., c], data_range=data_range, win_size=3,
                                    use_sample_covariance=False)
              for i in range(truth.shape[0]) for c in range(truth.shape[-1])]
    return float(np.mean(values))


def column_rmse(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> Dict[str, float]:
    """RMSE (Å) at column centres per sublattice/component; (N, H, W, 9) maps and mask."""
    out = {}
    for sub in SUBLATTICES:
        for comp in COMPONENTS:
            ch = displacement_channel(sub, comp)
            m = mask[..., ch]
            sel = m >= CENTRE
            if not np.any(sel):
                continue
            err = (pred[..., ch][sel] - truth[..., ch][sel]) / m[sel]
            out[DISPLACEMENT_CHANNELS[ch]] = float(np.sqrt(np.mean(err**2)))
    return out


def tilt_about_beam(disp: np.ndarray, mask: np.ndarray, a_ang: np.ndarray) -> np.ndarray:
    """Per-sample tilt about z (degrees) from O columns that are not B sites."""
    o_dx, o_dy = displacement_channel("O", "dx"), displacement_channel("O", "dy")
    o_mask = mask[..., o_dx]  # the mask of a channel is its sublattice's column weight
    b_mask = mask[..., displacement_channel("B", "dx")]
    sel = (o_mask >= CENTRE) & (b_mask < 0.1)
    dx = disp[..., o_dx] / np.maximum(o_mask, 1e-6)
    dy = disp[..., o_dy] / np.maximum(o_mask, 1e-6)
    tilts = []
    for i in range(disp.shape[0]):
        s = sel[i]
        rms = math.sqrt(float(np.mean(dx[i][s] ** 2 + dy[i][s] ** 2))) if np.any(s) else 0.0
        tilts.append(math.degrees(math.atan(2 * rms / float(a_ang[i]))))
    return np.asarray(tilts)


def score(truth: Dict[str, np.ndarray], pred: Dict[str, np.ndarray], a_ang: np.ndarray) -> dict:
    """All metrics of one predictor (dict maps in physical units, channels-last)."""
    result: dict = {}
    if "potential" in truth and "potential" in pred:
        result["potential_r2"] = r2(truth["potential"], pred["potential"])
        result["potential_psnr_db"] = psnr(truth["potential"], pred["potential"])
        result["potential_ssim"] = ssim(truth["potential"], pred["potential"])
    if "displacement" in truth and "displacement" in pred:
        mask = truth["displacement_mask"]
        per = column_rmse(truth["displacement"], pred["displacement"], mask)
        result["displacement_rmse_ang"] = per
        result["displacement_rmse_all_ang"] = float(np.sqrt(np.mean(np.square(list(per.values())))))
        tilt_true = tilt_about_beam(truth["displacement"], mask, a_ang)
        tilt_pred = tilt_about_beam(pred["displacement"], mask, a_ang)
        result["tilt_mae_deg"] = float(np.mean(np.abs(tilt_pred - tilt_true)))
    if "tilt" in truth and "tilt" in pred:
        result.update(tilt_map_mae(truth["tilt"], pred["tilt"]))
    return result


def tilt_map_mae(truth: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    """MAE (degrees) of (N, H, W, 3) tilt maps per axis (``tilt_map_mae_deg_x``, ``_y``,
    ``_z``) and about the in-plane axes x and y together (``_out_of_plane``)."""
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(truth, np.float64)).reshape(-1, len(TILT_CHANNELS))
    out = {f"tilt_map_mae_deg_{axis}": float(v) for axis, v in zip("xyz", err.mean(axis=0))}
    out["tilt_map_mae_deg_out_of_plane"] = float(err[:, :2].mean())
    return out


# ----------------------------------------------------------------------- baselines
def column_fit(images: np.ndarray, channel_names: List[str], mask: np.ndarray, radius_px: float = 1.5) -> np.ndarray:
    """Classical column fitting on STEM images → displacement maps (N, H, W, 9), dz = 0.

    Each column's ideal site is the sub-pixel centre of its Gaussian in the truth mask
    (the mask-weighted centroid around a local maximum); its position on the image is the
    background-subtracted intensity centroid in a disc of ``radius_px``, re-centred on
    itself until it stops moving (:func:`_refined_centroid`), on the
    HAADF image for A and B and on the inverted ABF image for O; the difference is
    (dx, dy). As for the labels, displacements are then taken relative to the A
    sublattice (its mean shift is subtracted) and drawn back with the mask's Gaussians.
    Returns pixels; the caller scales to Å.
    """
    names = [n.lower() for n in channel_names]
    if "haadf" not in names:
        raise UserError(f"column-fit baseline needs a HAADF channel; inputs are {channel_names}")
    haadf = images[..., names.index("haadf")]
    abf = -images[..., names.index("abf")] if "abf" in names else haadf
    n, h, w, _ = mask.shape
    out = np.zeros((n, h, w, 9), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]

    def centroid(weights, near):
        wts = weights[near]
        return float(np.sum(wts * yy[near]) / wts.sum()), float(np.sum(wts * xx[near]) / wts.sum())

    for i in range(n):
        found = []  # (sublattice, (y0, x0), (dy, dx))
        for s in range(3):
            m = mask[i, :, :, 3 * s]
            image = abf[i] if s == 2 else haadf[i]
            for (r, c) in find_peaks(m, 1, CENTRE):  # column centres of the truth mask
                near = (yy - r) ** 2 + (xx - c) ** 2 <= radius_px**2
                y0, x0 = centroid(m, near)
                fit = _refined_centroid(image, y0, x0, radius_px, yy, xx)
                if fit is not None:
                    found.append((s, (y0, x0), (fit[0] - y0, fit[1] - x0)))
        a_shift = np.mean([d for s, _, d in found if s == 0], axis=0) if any(s == 0 for s, _, _ in found) else 0.0
        for s, (y0, x0), d in found:
            dy, dx = np.asarray(d) - a_shift
            region = (yy - y0) ** 2 + (xx - x0) ** 2 <= (2 * radius_px) ** 2
            m = mask[i, :, :, 3 * s]
            out[i, region, 3 * s] += dx * m[region]
            out[i, region, 3 * s + 1] += dy * m[region]
    return out


def _refined_centroid(image, y: float, x: float, radius_px: float, yy, xx) -> Optional[tuple]:
    """Background-subtracted intensity centroid (px) in a disc re-centred on it until it stops.

    A single centroid in a disc that cuts a peak off is biased towards the disc's centre;
    for a symmetric peak the re-centred one converges on the peak. None if the disc is flat.
    """
    for _ in range(CENTROID_ITERATIONS):
        near = (yy - y) ** 2 + (xx - x) ** 2 <= radius_px**2
        weights = np.clip(image[near] - image[near].min(), 0, None)
        total = weights.sum()
        if total <= 0:
            return None
        new_y, new_x = float(np.sum(weights * yy[near]) / total), float(np.sum(weights * xx[near]) / total)
        moved = math.hypot(new_y - y, new_x - x)
        y, x = new_y, new_x
        if moved < 1e-4:
            break
    return y, x


# ------------------------------------------------------------------------- driver
def _collect(dataset, model, norm) -> tuple:
    """Run the model over a dataset: physical-unit truth, prediction, raw inputs, params."""
    truth: Dict[str, list] = {}
    pred: Dict[str, list] = {}
    inputs, params = [], []
    for x, targets in dataset:
        keep = targets["weight"].numpy() > 0
        outputs = model(x, training=False)
        phys_pred = norm.denormalize({k: v.numpy() for k, v in outputs.items()})
        phys_true = norm.denormalize({k: targets[k].numpy() for k in outputs})
        for key in outputs:
            truth.setdefault(key, []).append(phys_true[key][keep])
            pred.setdefault(key, []).append(phys_pred[key][keep])
        if "displacement_mask" in targets:
            truth.setdefault("displacement_mask", []).append(targets["displacement_mask"].numpy()[keep])
        inputs.append(x.numpy()[keep])
        params.append(targets["params"].numpy()[keep])
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    return cat(truth), cat(pred), np.concatenate(inputs), np.concatenate(params)


def training_means(data_dir, info, norm, batch_size: int = 16) -> Dict[str, np.ndarray]:
    """Per-pixel mean maps of the training split (physical units)."""
    from stemnet.data import make_dataset

    ds = make_dataset(data_dir, "train", batch_size=batch_size, targets=info["targets"], shuffle=False,
                      normalization=norm)
    sums: Dict[str, np.ndarray] = {}
    count = 0.0
    for _, targets in ds:
        w = targets["weight"].numpy()
        phys = norm.denormalize({k: targets[k].numpy() for k in info["targets"]})
        for key, value in phys.items():
            sums[key] = sums.get(key, 0.0) + np.tensordot(w, value, axes=1)
        count += float(w.sum())
    return {k: v / max(count, 1.0) for k, v in sums.items()}


def evaluate(run_dir, data_dir, split: str = "test", *, batch_size: int = 16,
             plot: Optional[Path] = None) -> dict:
    """Metrics of the run's model and of the baselines on ``split`` of ``data_dir``."""
    from stemnet.data import Normalization, make_dataset
    from stemnet.shards import read_manifest, simulation_section
    from stemnet.train.run import load_run

    model, cfg, info, norm_dict = load_run(run_dir)
    norm = Normalization.from_dict(norm_dict)
    manifest = read_manifest(data_dir)
    names = manifest["param_names"]
    if "a_ang" not in names:
        raise UserError(f"{data_dir}: parameter 'a_ang' missing; expected a stemnet simulation dataset")
    ds = make_dataset(data_dir, split, batch_size=batch_size, targets=info["targets"], shuffle=False,
                      normalization=norm, include_params=True)
    truth, pred, inputs, params = _collect(ds, model, norm)
    a_ang = params[:, names.index("a_ang")]
    n = len(a_ang)
    results = {"model": score(truth, pred, a_ang)}
    zero = {}
    if "potential" in truth:
        zero["potential"] = np.full_like(truth["potential"], norm.potential_mean)
    if "displacement" in truth:
        zero["displacement"] = np.zeros_like(truth["displacement"])
    if "tilt" in truth:
        zero["tilt"] = np.zeros_like(truth["tilt"])
    results["zero"] = score(truth, zero, a_ang)
    means = training_means(data_dir, info, norm, batch_size)
    results["mean"] = score(truth, {k: np.broadcast_to(v, truth[k].shape) for k, v in means.items()}, a_ang)
    if info["input_field"] == "stem" and "displacement" in truth:
        sim = simulation_section(manifest)
        channels = sim.detectors
        raw = norm.denormalize_inputs(inputs)
        fit = column_fit(raw, channels, truth["displacement_mask"])
        fov = sim.fov_ang
        if not fov:
            raise UserError(f"{data_dir}/manifest.json: extra.simulation.fov_ang missing; expected the field of view in Å")
        fit *= fov / truth["displacement"].shape[2]  # pixels → Å
        results["column-fit"] = score(truth, {"displacement": fit}, a_ang)
    summary = {"run": str(run_dir), "data": str(data_dir), "split": split, "samples": n, "metrics": results}
    if plot is not None:
        plot_predictions(plot, inputs, truth, pred)
    return summary


def format_table(summary: dict) -> str:
    """The metrics as a text table: one row per predictor."""
    rows = []
    header = (f"{'predictor':<11} {'pot R2':>8} {'PSNR dB':>8} {'SSIM':>6} {'disp RMSE Å':>12} {'tilt MAE °':>10} "
              f"{'tilt map x/y/z MAE °':>20}")
    rows.append(header)
    rows.append("-" * len(header))
    for name, m in summary["metrics"].items():
        def fmt(key, spec):
            value = m.get(key)
            return format(value, spec) if isinstance(value, (int, float)) else "-"
        rows.append(f"{name:<11} {fmt('potential_r2', '8.3f'):>8} {fmt('potential_psnr_db', '8.2f'):>8} "
                    f"{fmt('potential_ssim', '6.3f'):>6} {fmt('displacement_rmse_all_ang', '12.4f'):>12} "
                    f"{fmt('tilt_mae_deg', '10.2f'):>10} "
                    f"{'/'.join(fmt(f'tilt_map_mae_deg_{a}', '.2f') for a in 'xyz'):>20}")
    return "\n".join(rows)


def plot_predictions(path: Path, inputs, truth, pred, n: int = 3) -> None:
    """Figure: per sample, input, truth, prediction and error of each map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [k for k in ("potential", "displacement") if k in pred]
    n = min(n, len(inputs))
    cols = 1 + 3 * len(heads)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(inputs[i, ..., 0], cmap="gray")
        axes[i, 0].set_title("input" if i == 0 else "")
        for h, head in enumerate(heads):
            ch = 0 if head == "potential" else 3  # displacement: B_dx
            t, p = truth[head][i, ..., ch], pred[head][i, ..., ch]
            label = "V·Å" if head == "potential" else "B dx Å, at B columns"
            if head == "displacement":  # the loss and the metrics only see the columns
                p = p * truth["displacement_mask"][i, ..., ch]
            for j, (img, title, cmap) in enumerate([(t, "truth", "viridis"), (p, "prediction", "viridis"),
                                                    (p - t, "error", "coolwarm")]):
                ax = axes[i, 1 + 3 * h + j]
                im = ax.imshow(img, cmap=cmap)
                ax.set_title(f"{head} {title}\n({label})" if i == 0 else "", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, summary: dict) -> None:
    Path(path).write_text(json.dumps(summary, indent=1) + "\n")
