"""Module for measuring a micrograph's crystal lattice and checking it against the run.

The lattice comes from the image's Fourier transform: the two shortest reciprocal
vectors among the spectrum's peaks give the cell; it is then refined by least squares
on the fitted column positions. :func:`check_lattice` refuses a lattice the run never
saw (lattice parameter outside ±``LATTICE_TOLERANCE`` of every trained material, or a
cell that is not square for the [001] zone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from stemnet.errors import UserError, argument
from stemnet.reconstruct.peaks import find_peaks

LATTICE_TOLERANCE = 0.05  # relative: measured a vs the run's materials
SQUARE_TOLERANCE_DEG = 3.0  # angle between the cell vectors, [001] zone
FFT_PAD = 4  # zero padding of the spectrum (finer peak positions)
EXPLAINED_POWER = 0.95  # a supercell is undone only when its extra reflections hold under 5 % of the power
STRONG_PEAK = 0.0625  # power (a quarter in amplitude) of the strongest: a reflection the basis must index


@dataclass
class Lattice:
    """A 2-D lattice in pixel coordinates: site (u, v) at ``origin + u·e1 + v·e2``."""

    origin: np.ndarray  # (row, col) of an A site [px]
    basis: np.ndarray  # (2, 2): rows e1, e2 in (row, col) [px]

    @property
    def a_px(self) -> float:
        return float(np.mean(np.linalg.norm(self.basis, axis=1)))

    @property
    def lengths_px(self) -> np.ndarray:
        return np.linalg.norm(self.basis, axis=1)

    @property
    def angle_deg(self) -> float:
        e1, e2 = self.basis
        return math.degrees(math.acos(np.clip(e1 @ e2 / (np.linalg.norm(e1) * np.linalg.norm(e2)), -1, 1)))

    def coords(self, points: np.ndarray) -> np.ndarray:
        """Lattice coordinates (u, v) of ``(N, 2)`` (row, col) pixel positions."""
        return (np.asarray(points) - self.origin) @ np.linalg.inv(self.basis)

    def sites(self, uv: np.ndarray) -> np.ndarray:
        return self.origin + np.asarray(uv) @ self.basis


def fundamental_basis(ks: np.ndarray, power: np.ndarray, *, explained: float = EXPLAINED_POWER) -> Optional[np.ndarray]:
    """The reciprocal basis ``(2, 2)`` (rows g1, g2, cycles/px) of the fundamental lattice
    among spectral peaks ``ks`` (N, 2) of ``power`` (N,).

    The two shortest non-collinear peaks span the lattice unless they are superlattice
    reflections (octahedral tilts, ordering), which are shorter than the fundamental ones:
    half-order spots along one or both axes (a 2a × a or 2a × 2a cell) or at (½, ½) (a
    √2a × √2a cell). Each such supercell is undone -- g → 2g, or (g1 + g2, g1 − g2) --
    when the coarser reciprocal lattice still holds at least ``explained`` of the peaks'
    power (a peak within 0.12 of an integer combination) and its basis vectors are peaks
    at least as strong as the ones they replace. A weak shortest spot off every half
    order (a tilt superlattice seen through a sheared scan) spans no lattice of the strong
    reflections: the search then starts from the next shortest peak
    (:data:`STRONG_PEAK`). None when no pair is non-collinear."""
    ks, power = np.asarray(ks, np.float64), np.asarray(power, np.float64)
    order = np.argsort(np.hypot(ks[:, 0], ks[:, 1]))
    ks, power = ks[order], power[order]
    strong = ks[power >= STRONG_PEAK * power.max()]
    first = None
    for start in range(len(ks)):
        basis = _basis_from(ks, power, start, explained)
        if basis is None:
            continue
        first = basis if first is None else first
        hk = strong @ np.linalg.inv(basis)
        if np.all(np.abs(hk - np.round(hk)) < 0.2):  # every strong reflection indexed
            return basis
    return first


def _basis_from(ks: np.ndarray, power: np.ndarray, start: int, explained: float) -> Optional[np.ndarray]:
    """:func:`fundamental_basis` from peak ``start`` (``ks`` sorted by length) and the next
    shortest peak not collinear with it, supercells undone."""
    g1 = ks[start]
    second = [j for j in range(start + 1, len(ks)) if abs(g1[0] * ks[j, 1] - g1[1] * ks[j, 0])
              > 0.5 * np.linalg.norm(g1) * np.linalg.norm(ks[j])]
    if not second:
        return None
    g2 = ks[second[0]]
    total = power.sum()

    def strength(g):  # power of the peak at g (0 if there is none)
        d = np.linalg.norm(ks - g, axis=1)
        return float(power[np.argmin(d)]) if d.min() < 0.12 * np.linalg.norm(g) else 0.0

    def holds(g):
        hk = ks @ np.linalg.inv(g)
        return power[np.all(np.abs(hk - np.round(hk)) < 0.12, axis=1)].sum() >= explained * total

    best = np.array([g1, g2])
    floor = min(strength(g1), strength(g2))
    for cand in ([2 * g1, 2 * g2], [2 * g1, g2], [g1, 2 * g2], [g1 + g2, g1 - g2]):
        g = np.array(cand)
        if abs(np.linalg.det(g)) > abs(np.linalg.det(best)) * 1.01 and holds(g) \
                and min(strength(v) for v in g if not any(np.allclose(v, w) for w in (g1, g2))) >= floor:
            best = g
    return best


def fft_basis(image: np.ndarray, min_period_px: float = 2.5) -> Optional[np.ndarray]:
    """``(2, 2)`` real-space cell (rows e1, e2 in (row, col) px) of the fundamental lattice
    of the image's spectrum (Hann window, zero padded, peak centroids;
    :func:`fundamental_basis`); None when the spectrum shows no lattice."""
    image = np.asarray(image, np.float64)
    h, w = image.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    ny, nx = FFT_PAD * h, FFT_PAD * w
    spec = np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * win, s=(ny, nx))))
    cy, cx = ny // 2, nx // 2
    kr = np.hypot(*np.meshgrid((np.arange(ny) - cy) / ny, (np.arange(nx) - cx) / nx, indexing="ij"))  # cycles/px
    lowest = 2.0 / min(h, w)  # below two cycles over the field: background, not lattice
    spec[(kr < lowest) | (kr > 1.0 / min_period_px)] = 0
    if spec.max() <= 0:
        return None
    peaks = find_peaks(spec, FFT_PAD, 0.08 * spec.max())
    if len(peaks) < 2:
        return None
    r = FFT_PAD // 2
    ks = []
    for py, px in peaks:  # centroid of the peak's neighbourhood: sub-bin position
        y0, x0 = max(0, py - r), max(0, px - r)
        patch = spec[y0:py + r + 1, x0:px + r + 1]
        yy, xx = np.mgrid[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
        wgt = patch**2
        ks.append((((wgt * yy).sum() / wgt.sum() - cy) / ny, ((wgt * xx).sum() / wgt.sum() - cx) / nx))
    ks = np.array(ks)
    power = np.array([spec[py, px] for py, px in peaks]) ** 2
    basis = fundamental_basis(ks, power)
    return None if basis is None else np.linalg.inv(basis).T  # e_i · g_j = δ_ij


def fit_lattice(points: np.ndarray, basis: np.ndarray, half: Optional[np.ndarray] = None,
                centre: Optional[np.ndarray] = None) -> Lattice:
    """Least-squares lattice through ``points`` (row, col), indexed from ``basis``,
    growing outwards from the point nearest ``centre`` so that a basis a few per cent
    off still indexes the whole field. ``half``: per point, whether it sits at the cell
    centre (u + ½, v + ½) rather than on a corner."""
    points = np.asarray(points, np.float64)
    half = np.zeros(len(points), bool) if half is None else np.asarray(half, bool)
    corner = points[~half] if (~half).any() else points
    centre = points.mean(axis=0) if centre is None else np.asarray(centre, float)
    lattice = Lattice(corner[np.argmin(np.linalg.norm(corner - centre, axis=1))].copy(), np.array(basis, float))
    a = lattice.a_px
    for radius in (2.6 * a, 5 * a, 10 * a, np.inf):
        near = np.linalg.norm(points - lattice.origin, axis=1) <= radius
        if near.sum() < 3:
            continue
        shift = np.where(half[near], 0.5, 0.0)[:, None]
        uv = np.round(lattice.coords(points[near]) - shift) + shift
        design = np.column_stack([np.ones(len(uv)), uv])
        if np.linalg.matrix_rank(design) < 3:
            continue
        solution, *_ = np.linalg.lstsq(design, points[near], rcond=None)
        lattice = Lattice(solution[0], solution[1:])
    return lattice


def check_lattice(lattice: Optional[Lattice], pixel_ang: float, info: dict, where: str, *,
                  force: bool = False) -> dict:
    """Compare the measured lattice with the run's materials and zone; refuse a mismatch
    (one-line :class:`UserError`) unless ``force``. Returns what was measured."""
    materials = {k: float(m["a"]) for k, m in (info.get("materials") or {}).items() if m.get("a")}
    zone = str(info.get("zone") or "001")
    if lattice is None:
        result = {"measured": False, "forced": force, "problem": "no lattice found in the image's spectrum"}
        if not force:
            raise UserError(f"{where}: no crystal lattice found in the image's Fourier transform; expected a "
                            f"[{zone}] perovskite ({', '.join(f'{k} a = {v:.3f} Å' for k, v in materials.items())}); "
                            f"pass {argument('force')} to reconstruct anyway")
        return result
    lengths = lattice.lengths_px * pixel_ang
    angle = lattice.angle_deg
    a = float(np.mean(lengths))
    problems = []
    if materials and not any(abs(a / v - 1) <= LATTICE_TOLERANCE for v in materials.values()):
        problems.append(f"lattice parameter {a:.3f} Å, expected "
                        + " or ".join(f"{v:.3f} Å ({k})" for k, v in materials.items())
                        + f" ± {LATTICE_TOLERANCE:.0%}")
    if zone == "001":
        if abs(angle - 90) > SQUARE_TOLERANCE_DEG or abs(lengths[0] / lengths[1] - 1) > LATTICE_TOLERANCE:
            problems.append(f"cell {lengths[0]:.3f} × {lengths[1]:.3f} Å at {angle:.1f}°, expected a square cell "
                            f"for the [001] zone (90 ± {SQUARE_TOLERANCE_DEG:g}°)")
    result = {"measured": True, "a_ang": a, "lengths_ang": [float(v) for v in lengths], "angle_deg": angle,
              "expected_a_ang": materials, "zone": zone, "forced": bool(force and problems),
              "problem": "; ".join(problems)}
    if problems and not force:
        raise UserError(f"{where}: the micrograph's lattice does not match the run: {'; '.join(problems)}; "
                        f"pass {argument('force')} to reconstruct anyway")
    return result
