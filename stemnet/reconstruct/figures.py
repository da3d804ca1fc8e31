"""Module for the reconstruction figure: polarisation on the image, tilt map, uncertainty."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from stemnet.reconstruct.columns import SUBLATTICES
from stemnet.reconstruct.outputs import Reconstruction


def _canvas(path, rec: Reconstruction):
    """pyplot (Agg), the output path, the image extent [Å], the HAADF (or first) input,
    the column table and the lattice parameter [Å] of a reconstruction figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = rec.input.shape[1:]
    p = rec.pixel_size_ang
    channels = rec.provenance.get("channels", [])
    base = rec.input[channels.index("haadf")] if "haadf" in channels else rec.input[0]
    return plt, Path(path), (0, w * p, h * p, 0), base, rec.columns, float(rec.summary.get("a_ang") or 3.9)


def _nice(value: float) -> float:
    """A round reference length near ``value`` (1, 2 or 5 × 10^k)."""
    value = max(float(value), 1e-6)
    ref = 10 ** math.floor(math.log10(value))
    return ref * (5 if value >= 5 * ref else 2 if value >= 2 * ref else 1)


def _cell_map(ax, fig, cols, key: str, a_ang: float, title: str, lim=None, width_ang=None) -> None:
    b = (cols["sublattice"] == 1) & np.isfinite(cols.get(key, np.full(len(cols["sublattice"]), np.nan)))
    if not b.any():
        ax.text(0.5, 0.5, f"{title}:\nnot available", ha="center", va="center", transform=ax.transAxes)
        return
    values = cols[key][b]
    lim = lim or max(float(np.abs(values).max()), 1e-3)
    signed = "_from_O" in key  # the tilt head's maps are magnitudes (stemnet.data.tilt_target)
    cmap, vmin = ("RdBu_r", -lim) if signed else ("viridis", 0.0)
    sc = ax.scatter(cols["ideal_x_ang"][b], cols["ideal_y_ang"][b], c=values, cmap=cmap, vmin=vmin, vmax=lim,
                    marker="s", s=_cell_size(ax, fig, a_ang, width_ang, len(values)), edgecolors="none")
    fig.colorbar(sc, ax=ax, fraction=0.046, label="degrees")
    ax.set_title(title, fontsize=9)


def _cell_size(ax, fig, a_ang: float, width_ang, n: int) -> float:
    """Marker area (points²) of a square 0.9 cells wide: from the axes' width when the
    field of view ``width_ang`` is known, else a guess from the number of cells."""
    if not width_ang:
        return (72 * 0.9 * a_ang / 4) ** 2 / max(1.0, n / 16)
    points = ax.get_position().width * fig.get_figwidth() * 72  # axes width in points
    return (0.9 * a_ang * points / width_ang) ** 2


def _quiver(ax, cols, key: str, colour: str, label: str, a_ang: float, *, ref=None, key_arrow: bool = True):
    """Arrows ``cols[key_x_pm], cols[key_y_pm]`` at the B columns' ideal sites, ``ref`` pm
    (default: a round 90th percentile) drawn a third of a cell long."""
    if f"{key}_x_pm" not in cols:
        return None
    ok = (np.asarray(cols["sublattice"]) == 1) & np.isfinite(cols[f"{key}_x_pm"]) & np.isfinite(cols[f"{key}_y_pm"])
    if not ok.any():
        return None
    u, v = cols[f"{key}_x_pm"][ok], cols[f"{key}_y_pm"][ok]
    ref = ref or _nice(np.percentile(np.hypot(u, v), 90))
    q = ax.quiver(cols["ideal_x_ang"][ok], cols["ideal_y_ang"][ok], u, v, color=colour, angles="xy",
                  scale_units="xy", scale=ref / (a_ang / 3), width=0.006, label=label)
    if key_arrow:
        ax.quiverkey(q, 0.78, 1.02, ref, f"{ref:g} pm", labelpos="E", coordinates="axes")
    return ref


def _save(fig, path: Path, plt) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def plot_truth_comparison(path: Path, rec: Reconstruction, truth: dict) -> None:
    """PNG (atomic), network beside truth: the image with the polarisation vectors (B off
    its A-cell centre, same arrow scale), and the per-cell tilt about x, y and z (same
    colour range). ``truth``: per row of ``rec.columns``, ``pol_x_pm``, ``pol_y_pm``,
    ``tilt_{x,y,z}_deg`` (NaN where the column has no true partner)."""
    plt, path, extent, base, cols, a_ang = _canvas(path, rec)
    site = {k: cols[k] for k in ("ideal_x_ang", "ideal_y_ang", "sublattice")}
    rows = (("network", dict(site, pol_x_pm=cols.get("pol_net_x_pm"), pol_y_pm=cols.get("pol_net_y_pm"),
                             **{f"tilt_{a}_deg": cols[f"tilt_{a}_deg"] for a in "xyz" if f"tilt_{a}_deg" in cols})),
            ("truth", dict(site, **truth)))
    rows = [(name, {k: v for k, v in c.items() if v is not None}) for name, c in rows]
    true_pol = np.hypot(truth["pol_x_pm"], truth["pol_y_pm"])
    ref = _nice(np.nanpercentile(true_pol, 90)) if np.isfinite(true_pol).any() else None
    fig, axes = plt.subplots(2, 4, figsize=(16, 8), squeeze=False)
    for r, (name, c) in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(base, cmap="gray", extent=extent)
        _quiver(ax, c, "pol", "tab:red" if r == 0 else "tab:green", name, a_ang, ref=ref)
        ax.set_title(f"polarisation, {name}: B off its A-cell centre", fontsize=9, pad=16)
        for k, axis in enumerate("xyz"):
            ax = axes[r, k + 1]
            ax.imshow(base, cmap="gray", extent=extent, alpha=0.35)
            t = np.asarray(truth.get(f"tilt_{axis}_deg", np.nan), float)
            lim = float(np.nanmax(np.abs(t))) if np.isfinite(t).any() else None
            _cell_map(ax, fig, c, f"tilt_{axis}_deg", a_ang, f"|tilt| about {axis} per cell ({name})",
                      lim=max(lim, 0.5) if lim is not None else None, width_ang=extent[1] / 1.25)
        for ax in axes[r]:
            ax.set_xlim(0, extent[1])
            ax.set_ylim(extent[2], 0)
            ax.set_xlabel("x (Å)")
            ax.set_ylabel("y (Å)")
    fig.suptitle(f"{rec.name}: network (top) and truth (bottom)")
    fig.tight_layout()
    _save(fig, path, plt)


def plot_reconstruction(path: Path, rec: Reconstruction) -> None:
    """PNG (atomic): the image with polarisation vectors (network red, Gaussian fit cyan),
    the per-cell tilt map(s), the potential and the ensemble uncertainty."""
    plt, path, extent, base, cols, a_ang = _canvas(path, rec)
    tilt_keys = [k for k in ("tilt_x_deg", "tilt_y_deg", "tilt_z_deg") if k in cols]
    tilt_panels = tilt_keys or ["tilt_z_deg_from_O"]
    if np.isfinite(cols.get("tilt_z_deg_from_O_fit", np.nan)).any():  # the classical estimate beside
        tilt_panels = tilt_panels + ["tilt_z_deg_from_O_fit"]
    n = 3 + len(tilt_panels)
    ncol = 3
    fig, axes = plt.subplots(math.ceil(n / ncol), ncol, figsize=(4.2 * ncol, 4 * math.ceil(n / ncol)), squeeze=False)
    flat = list(axes.ravel())
    ax = flat.pop(0)
    ax.imshow(base, cmap="gray", extent=extent)
    ax.set_title("polarisation: B off its A-cell centre", fontsize=9, pad=16)
    for key, colour, label in (("pol_net", "tab:red", "network"), ("pol_fit", "tab:cyan", "Gaussian fit")):
        _quiver(ax, cols, key, colour, label, a_ang, key_arrow=key == "pol_net")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, extent[1])
    ax.set_ylim(extent[2], 0)
    for key in tilt_panels:
        ax = flat.pop(0)
        ax.imshow(base, cmap="gray", extent=extent, alpha=0.35)
        what = {"from_O": "network's O displacements", "from_O_fit": "fitted O columns"}.get(
            key.split("_deg_")[-1], "network")
        _cell_map(ax, fig, cols, key, a_ang, f"{'tilt' if '_from_O' in key else '|tilt|'} about {key[5]} "
                                             f"per cell ({what})")
        ax.set_xlim(0, extent[1])
        ax.set_ylim(extent[2], 0)
    ax = flat.pop(0)
    if "potential" in rec.maps:
        im = ax.imshow(rec.maps["potential"][..., 0], cmap="viridis", extent=extent)
        fig.colorbar(im, ax=ax, fraction=0.046, label="V·Å")
        ax.set_title("projected potential", fontsize=9)
    ax = flat.pop(0)
    head = "displacement" if "displacement" in rec.spread else next(iter(rec.spread))
    scale = rec.summary.get("variance_scale") or {}  # per sublattice, on its three displacement channels
    factor = np.repeat([scale.get(n, 1.0) for n in SUBLATTICES], 3) if head == "displacement" else 1.0
    unc = np.sqrt(np.mean((factor * rec.spread[head]) ** 2, axis=-1))
    im = ax.imshow(unc, cmap="magma", extent=extent)
    fig.colorbar(im, ax=ax, fraction=0.046, label="Å" if head == "displacement" else "")
    ax.set_title(f"uncertainty of {head} (rms over channels)", fontsize=9)
    for a in flat:
        a.axis("off")
    for a in axes.ravel():
        if a.axison:
            a.set_xlabel("x (Å)")
            a.set_ylabel("y (Å)")
    fig.suptitle(rec.name)
    fig.tight_layout()
    _save(fig, path, plt)
