"""Module for the reconstruction figure: polarisation on the image, tilt map, uncertainty."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from stemnet.reconstruct.outputs import Reconstruction


def _nice(value: float) -> float:
    """A round reference length near ``value`` (1, 2 or 5 × 10^k)."""
    value = max(float(value), 1e-6)
    ref = 10 ** math.floor(math.log10(value))
    return ref * (5 if value >= 5 * ref else 2 if value >= 2 * ref else 1)


def _cell_map(ax, fig, cols, key: str, a_ang: float, title: str) -> None:
    b = (cols["sublattice"] == 1) & np.isfinite(cols.get(key, np.full(len(cols["sublattice"]), np.nan)))
    if not b.any():
        ax.text(0.5, 0.5, f"{title}:\nnot available", ha="center", va="center", transform=ax.transAxes)
        return
    values = cols[key][b]
    lim = max(float(np.abs(values).max()), 1e-3)
    sc = ax.scatter(cols["ideal_x_ang"][b], cols["ideal_y_ang"][b], c=values, cmap="RdBu_r", vmin=-lim, vmax=lim,
                    marker="s", s=(72 * 0.9 * a_ang / 4) ** 2 / max(1.0, len(values) / 16), edgecolors="none")
    fig.colorbar(sc, ax=ax, fraction=0.046, label="degrees")
    ax.set_title(title, fontsize=9)


def plot_reconstruction(path: Path, rec: Reconstruction) -> None:
    """PNG (atomic): the image with polarisation vectors (network red, Gaussian fit cyan),
    the per-cell tilt map(s), the potential and the ensemble uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    h, w = rec.input.shape[1:]
    p = rec.pixel_size_ang
    extent = (0, w * p, h * p, 0)
    channels = rec.provenance.get("channels", [])
    base = rec.input[channels.index("haadf")] if "haadf" in channels else rec.input[0]
    cols = rec.columns
    a_ang = float(rec.summary.get("a_ang") or 3.9)
    tilt_keys = [k for k in ("tilt_x_deg", "tilt_y_deg", "tilt_z_deg") if k in cols]
    tilt_panels = tilt_keys or ["tilt_z_deg_from_O"]
    n = 3 + len(tilt_panels)
    ncol = 3
    fig, axes = plt.subplots(math.ceil(n / ncol), ncol, figsize=(4.2 * ncol, 4 * math.ceil(n / ncol)), squeeze=False)
    flat = list(axes.ravel())
    ax = flat.pop(0)
    ax.imshow(base, cmap="gray", extent=extent)
    ax.set_title("polarisation: B off its A-cell centre", fontsize=9, pad=16)
    b = cols.get("sublattice", np.zeros(0)) == 1
    for key, colour, label in (("pol_net", "tab:red", "network"), ("pol_fit", "tab:cyan", "Gaussian fit")):
        if f"{key}_x_pm" not in cols:
            continue
        ok = b & np.isfinite(cols[f"{key}_x_pm"])
        if not ok.any():
            continue
        u, v = cols[f"{key}_x_pm"][ok], cols[f"{key}_y_pm"][ok]
        ref = _nice(np.percentile(np.hypot(u, v), 90))
        q = ax.quiver(cols["ideal_x_ang"][ok], cols["ideal_y_ang"][ok], u, v, color=colour, angles="xy",
                      scale_units="xy", scale=ref / (a_ang / 3), width=0.006, label=label)
        if key == "pol_net":
            ax.quiverkey(q, 0.78, 1.02, ref, f"{ref:g} pm", labelpos="E", coordinates="axes")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, w * p)
    ax.set_ylim(h * p, 0)
    for key in tilt_panels:
        ax = flat.pop(0)
        ax.imshow(base, cmap="gray", extent=extent, alpha=0.35)
        what = "from the O displacements" if key.endswith("from_O") else "network"
        _cell_map(ax, fig, cols, key, a_ang, f"tilt about {key[5]} per cell ({what})")
        ax.set_xlim(0, w * p)
        ax.set_ylim(h * p, 0)
    ax = flat.pop(0)
    if "potential" in rec.maps:
        im = ax.imshow(rec.maps["potential"][..., 0], cmap="viridis", extent=extent)
        fig.colorbar(im, ax=ax, fraction=0.046, label="V·Å")
        ax.set_title("projected potential", fontsize=9)
    ax = flat.pop(0)
    head = "displacement" if "displacement" in rec.spread else next(iter(rec.spread))
    scale = float(rec.summary.get("variance_scale", 1.0))
    unc = scale * np.sqrt(np.mean(rec.spread[head] ** 2, axis=-1))
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
