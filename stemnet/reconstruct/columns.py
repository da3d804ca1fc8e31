"""Module for the atomic columns of a micrograph: found, fitted, assigned and measured.

1. The cell comes from the image's Fourier transform (:func:`~stemnet.reconstruct.lattice.fft_basis`).
2. Bright columns are the local maxima (:func:`~stemnet.reconstruct.peaks.find_peaks`) of
   the column image (HAADF, or an inverted bright-field image) smoothed by σ = 0.05 a,
   at least 0.3 a apart, refined by 2-D Gaussian fits in a disk of 0.3 a
   (:func:`~stemnet.reconstruct.peaks.fit_gaussians`).
3. Lattice position sorts them: columns at the cell corners and at the cell centres form
   the two cation sublattices; the brighter one (Z contrast) is A when the run's
   materials have Z(A) ≥ Z(B), else B. The lattice is refined on the A columns.
4. O columns (non-B-site) sit at the edge centres of the A lattice; with an ABF image
   they are fitted on the inverted ABF, otherwise they keep their ideal site.
5. At every column the network's maps are read (bilinear, on the run's grid):
   dx, dy, dz of its sublattice with the ensemble spread (× the run's calibrated
   variance scale), the potential; the Gaussian-fit displacement from the ideal site
   sits beside it.
6. Per cell (a B column): the polarisation, B off the centre of its four A columns [pm],
   from the fits and from the network; the octahedral tilt about z from the network's
   four O displacements around it, θz = mean (r × d)_z / |r|²; and, when the run
   predicts ``tilt``, its tilt magnitudes about x, y, z with spread
   (:func:`stemnet.data.tilt_target`).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from stemnet.data.layout import SUBLATTICES
from stemnet.log import get_logger
from stemnet.reconstruct.lattice import Lattice, fft_basis, fit_lattice
from stemnet.reconstruct.peaks import find_peaks, fit_gaussians

log = get_logger("reconstruct")
FFT_CROP = 512  # the spectrum is taken on the central FFT_CROP² pixels at most


def a_brighter(info: dict) -> bool:
    """Whether the A column is the brighter HAADF column for the run's materials (Z_A ≥ Z_B)."""
    from ase.data import atomic_numbers

    votes = [atomic_numbers.get(m.get("A"), 0) >= atomic_numbers.get(m.get("B"), 0)
             for m in (info.get("materials") or {}).values()]
    return all(votes) if votes else True


def _central(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[y0:y0 + size, x0:x0 + size]


def find_lattice_columns(image: np.ndarray, *, a_is_brighter: bool = True,
                         abf: Optional[np.ndarray] = None) -> Tuple[Dict[str, np.ndarray], Optional[Lattice]]:
    """Columns of a [001] perovskite image (bright columns bright), in pixels.

    Returns a table (``row``, ``col``: fitted or ideal position; ``ideal_row``,
    ``ideal_col``; ``sublattice`` 0 A, 1 B, 2 O; ``u``, ``v`` lattice coordinates;
    ``amplitude``, ``sigma_px``; ``fitted``) and the A lattice (None if none was found).
    """
    from scipy import ndimage

    image = np.asarray(image, np.float64)
    basis = fft_basis(_central(image, FFT_CROP))
    empty = {k: np.zeros(0) for k in ("row", "col", "ideal_row", "ideal_col", "u", "v", "amplitude", "sigma_px")}
    empty.update(sublattice=np.zeros(0, np.int8), fitted=np.zeros(0, bool))
    if basis is None:
        return empty, None
    a_px = float(np.mean(np.linalg.norm(basis, axis=1)))
    smooth = ndimage.gaussian_filter(image, max(0.5, 0.05 * a_px), mode="reflect")
    peaks = find_peaks(smooth, 0.3 * a_px, float(np.median(smooth)), exclude_border=True)
    fits = fit_gaussians(image, peaks, 0.3 * a_px, 0.1 * a_px)
    ok = np.isfinite(fits[:, 0])
    fits = fits[ok]
    order = np.argsort(-fits[:, 3])  # two peaks that converged on one column: keep the brighter
    keep = []
    for i in order:
        if all(np.hypot(*(fits[i, :2] - fits[j, :2])) > 0.2 * a_px for j in keep):
            keep.append(i)
    fits = fits[sorted(keep)]
    if len(fits) < 4:
        return empty, None
    pts = fits[:, :2]
    centre = np.array(image.shape, float) / 2
    origin = pts[np.argmin(np.linalg.norm(pts - centre, axis=1))]
    uv = Lattice(origin, basis).coords(pts)  # the FFT cell is exact to < 0.1 %: index from it directly
    frac = uv - np.floor(uv)
    corner = np.all(np.minimum(frac, 1 - frac) < 0.25, axis=1)
    middle = np.all(np.abs(frac - 0.5) < 0.25, axis=1)
    on = corner | middle
    if not corner.any() or not middle.any():
        log.warning("columns: one cation sublattice only; A and B not told apart")
        brighter_corner = True
    else:
        brighter_corner = fits[corner, 3].mean() >= fits[middle, 3].mean()
    a_on_corner = brighter_corner == a_is_brighter
    is_b = middle if a_on_corner else corner
    origin = origin if a_on_corner else origin + 0.5 * basis.sum(axis=0)
    lattice = fit_lattice(pts[on], basis, half=is_b[on], centre=origin)
    is_a = on & ~is_b
    if is_a.sum() >= 3:  # the reference lattice is the A sublattice's own (B shifts stay out of it)
        lattice = fit_lattice(pts[is_a], lattice.basis, centre=lattice.origin)
    fits, is_b = fits[on], is_b[on]
    shift = np.where(is_b, 0.5, 0.0)[:, None]
    uv = np.round(lattice.coords(fits[:, :2]) - shift) + shift
    ideal = lattice.sites(uv)
    # O columns: edge centres of the A lattice inside the image
    h, w = image.shape
    lo, hi = np.floor(lattice.coords(np.array([[0, 0], [0, w], [h, 0], [h, w]])).min(0)) - 1, \
        np.ceil(lattice.coords(np.array([[0, 0], [0, w], [h, 0], [h, w]])).max(0)) + 1
    grid = np.stack(np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    o_uv = np.concatenate([grid + [0.5, 0.0], grid + [0.0, 0.5]])
    o_ideal = lattice.sites(o_uv)
    margin = 0.3 * a_px
    inside = np.all((o_ideal >= margin) & (o_ideal <= np.array([h, w]) - 1 - margin), axis=1)
    o_uv, o_ideal = o_uv[inside], o_ideal[inside]
    o_fit = np.full((len(o_uv), 5), np.nan)
    if abf is not None and len(o_uv):
        o_fit = fit_gaussians(-np.asarray(abf, np.float64), o_ideal, 0.2 * a_px, 0.08 * a_px)
    o_ok = np.isfinite(o_fit[:, 0])
    o_pos = np.where(o_ok[:, None], o_fit[:, :2], o_ideal)
    table = {
        "row": np.concatenate([fits[:, 0], o_pos[:, 0]]),
        "col": np.concatenate([fits[:, 1], o_pos[:, 1]]),
        "ideal_row": np.concatenate([ideal[:, 0], o_ideal[:, 0]]),
        "ideal_col": np.concatenate([ideal[:, 1], o_ideal[:, 1]]),
        "sublattice": np.concatenate([np.where(is_b, 1, 0), np.full(len(o_uv), 2)]).astype(np.int8),
        "u": np.concatenate([uv[:, 0], o_uv[:, 0]]),
        "v": np.concatenate([uv[:, 1], o_uv[:, 1]]),
        "amplitude": np.concatenate([fits[:, 3], np.where(o_ok, o_fit[:, 3], np.nan)]),
        "sigma_px": np.concatenate([fits[:, 2], np.where(o_ok, o_fit[:, 2], np.nan)]),
        "fitted": np.concatenate([np.ones(len(fits), bool), o_ok]),
    }
    return table, lattice


def _sample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if len(rows) == 0:
        return np.zeros(0)
    return ndimage.map_coordinates(np.asarray(image, np.float64), np.stack([rows, cols]), order=1, mode="nearest")


def column_statistics(found: Dict[str, np.ndarray], lattice: Optional[Lattice], pixel_ang: float,
                      maps: Dict[str, np.ndarray], spread: Dict[str, np.ndarray], map_pixel_ang: float,
                      variance_scale=1.0, tilt_scale: float = 1.0) -> Tuple[Dict[str, np.ndarray], dict]:
    """Per-column table (Å, pm, degrees) and summary from the found columns (pixels of an
    image with ``pixel_ang`` Å pixels) and the network's maps (``map_pixel_ang``).
    ``variance_scale``: one factor on the ensemble spread, or one per sublattice (A, B, O)."""
    scales = np.broadcast_to(np.asarray(variance_scale, np.float64), (len(SUBLATTICES),))
    sub = found["sublattice"]
    n = len(sub)
    x_ang, y_ang = (found["col"] + 0.5) * pixel_ang, (found["row"] + 0.5) * pixel_ang
    ix, iy = (found["ideal_col"] + 0.5) * pixel_ang, (found["ideal_row"] + 0.5) * pixel_ang
    table: Dict[str, np.ndarray] = {
        "x_ang": x_ang, "y_ang": y_ang, "ideal_x_ang": ix, "ideal_y_ang": iy, "sublattice": sub,
        "u": found["u"], "v": found["v"], "fitted": found["fitted"].astype(np.int8),
        "intensity": found["amplitude"], "sigma_ang": found["sigma_px"] * pixel_ang,
        "fit_dx_ang": np.where(found["fitted"], x_ang - ix, np.nan),
        "fit_dy_ang": np.where(found["fitted"], y_ang - iy, np.nan),
    }
    mr, mc = iy / map_pixel_ang - 0.5, ix / map_pixel_ang - 0.5  # network maps are read at the ideal site
    if "potential" in maps:
        table["potential"] = _sample(maps["potential"][..., 0], mr, mc)
    summary: dict = {"columns": int(n), "lattice_fitted": lattice is not None,
                     "variance_scale": dict(zip(SUBLATTICES, scales.tolist()))}
    if lattice is not None:
        summary["a_ang"] = lattice.a_px * pixel_ang
    if "displacement" in maps:
        disp, std = np.zeros((n, 3)), np.zeros((n, 3))
        for s in range(3):
            on = sub == s
            for c in range(3):
                disp[on, c] = _sample(maps["displacement"][..., 3 * s + c], mr[on], mc[on])
                std[on, c] = scales[s] * _sample(spread["displacement"][..., 3 * s + c], mr[on], mc[on])
        for c, comp in enumerate(("dx", "dy", "dz")):
            table[f"{comp}_ang"] = disp[:, c]
            table[f"std_{comp}_ang"] = std[:, c]
        table["net_x_ang"], table["net_y_ang"] = ix + disp[:, 0], iy + disp[:, 1]
        for s, name in enumerate(SUBLATTICES):
            on = sub == s
            summary[name] = {"count": int(on.sum()),
                             "mean_d_ang": [float(v) for v in disp[on].mean(axis=0)] if on.any() else [0.0] * 3,
                             "mean_abs_d_ang": float(np.linalg.norm(disp[on], axis=1).mean()) if on.any() else 0.0}
    else:
        for s, name in enumerate(SUBLATTICES):
            summary[name] = {"count": int((sub == s).sum())}
    table.update(_per_cell(found, table, maps, spread, mr, mc, tilt_scale))
    b = sub == 1
    for key in ("pol_fit_x_pm", "pol_fit_y_pm", "pol_net_x_pm", "pol_net_y_pm", "tilt_z_deg_from_O",
                "tilt_z_deg_from_O_fit", "tilt_x_deg", "tilt_y_deg", "tilt_z_deg"):
        if key in table:
            values = table[key][b]
            values = values[np.isfinite(values)]
            summary[f"mean_{key}"] = float(values.mean()) if len(values) else None
            if key.startswith("tilt"):
                summary[f"mean_abs_{key}"] = float(np.abs(values).mean()) if len(values) else None
    if summary.get("mean_abs_tilt_z_deg_from_O") is not None:
        summary["tilt_deg"] = summary["mean_abs_tilt_z_deg_from_O"]
        z = table["tilt_z_deg_from_O"][b]
        summary["tilt_spread_deg"] = float(np.nanstd(np.abs(z))) if np.isfinite(z).any() else None
    return table, summary


def rotation_deg(rx, ry, dx, dy) -> float:
    """Rotation about z [deg, counter-clockwise] of the columns at offsets (rx, ry) [Å] from
    a centre that moved them by (dx, dy) [Å]: the mean of (r × d)/|r|² (small angles)."""
    rx, ry, dx, dy = (np.asarray(v, np.float64) for v in (rx, ry, dx, dy))
    return math.degrees(float(np.mean((rx * dy - ry * dx) / (rx**2 + ry**2))))


def _per_cell(found, table, maps, spread, mr, mc, tilt_scale) -> Dict[str, np.ndarray]:
    """Per B column: polarisation (fit and network, pm) and tilt angles (degrees; about z also
    from the four O columns around it, the network's and the fitted positions); NaN elsewhere."""
    sub = found["sublattice"]
    n = len(sub)
    key = {(int(round(2 * u)), int(round(2 * v))): i for i, (u, v) in enumerate(zip(found["u"], found["v"]))}
    out = {k: np.full(n, np.nan) for k in ("pol_fit_x_pm", "pol_fit_y_pm")}
    have_net = "dx_ang" in table
    out["tilt_z_deg_from_O_fit"] = np.full(n, np.nan)
    if have_net:
        out.update({k: np.full(n, np.nan) for k in ("pol_net_x_pm", "pol_net_y_pm", "std_pol_net_pm",
                                                     "tilt_z_deg_from_O")})
    corners = ((-1, -1), (1, -1), (-1, 1), (1, 1))
    edges = ((-1, 0), (1, 0), (0, -1), (0, 1))  # O around a B at (2u, 2v) doubled coordinates
    for i in np.flatnonzero(sub == 1):
        ku, kv = int(round(2 * found["u"][i])), int(round(2 * found["v"][i]))
        a = [key.get((ku + du, kv + dv)) for du, dv in corners]
        if all(j is not None for j in a):
            a = np.array(a)
            if found["fitted"][a].all():
                out["pol_fit_x_pm"][i] = 100 * (table["x_ang"][i] - table["x_ang"][a].mean())
                out["pol_fit_y_pm"][i] = 100 * (table["y_ang"][i] - table["y_ang"][a].mean())
            if have_net:
                out["pol_net_x_pm"][i] = 100 * (table["dx_ang"][i] - table["dx_ang"][a].mean())
                out["pol_net_y_pm"][i] = 100 * (table["dy_ang"][i] - table["dy_ang"][a].mean())
                out["std_pol_net_pm"][i] = 100 * math.hypot(table["std_dx_ang"][i], table["std_dy_ang"][i])
        o = [key.get((ku + du, kv + dv)) for du, dv in edges]
        if all(j is not None for j in o):
            o = np.array(o)
            rx = table["ideal_x_ang"][o] - table["ideal_x_ang"][i]
            ry = table["ideal_y_ang"][o] - table["ideal_y_ang"][i]
            if have_net:
                out["tilt_z_deg_from_O"][i] = rotation_deg(rx, ry, table["dx_ang"][o], table["dy_ang"][o])
            if found["fitted"][o].all():  # the classical estimate: the O columns' fitted positions
                out["tilt_z_deg_from_O_fit"][i] = rotation_deg(rx, ry, table["fit_dx_ang"][o], table["fit_dy_ang"][o])
    if "tilt" in maps:
        b = sub == 1
        for c, axis in enumerate("xyz"):
            out[f"tilt_{axis}_deg"] = np.where(b, _sample(maps["tilt"][..., c], mr, mc), np.nan)
            out[f"std_tilt_{axis}_deg"] = np.where(b, tilt_scale * _sample(spread["tilt"][..., c], mr, mc), np.nan)
    return out
