"""Module for the abTEM settings every simulation runs under, and the checks of its inputs."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import abtem
import numpy as np
from ase import Atoms

# abTEM < 1.0.10 mis-slices atoms on slice boundaries and drops top-edge ones (simulation.multislice notes)
ABTEM_VERSION = tuple(int(p) for p in abtem.__version__.split(".")[:3])
ABTEM_MISSLICES = ABTEM_VERSION < (1, 0, 10)
# abTEM < 1.0.11 normalises aberrated PRISM probes by sum(a_k**2) (images.py, the PRISM fix);
# 1.0.11 uses sum(|a_k|**2) (1.0.10 still has the old line, read in its wheel)
ABTEM_PRISM_MISNORMALISES = ABTEM_VERSION < (1, 0, 11)

FovAng = Sequence[Sequence[float]]  # ((x0, y0), (x1, y1)) [Å]

ENERGY_RANGE_EV = (60e3, 300e3)


def _fft_backend() -> str:
    try:
        import pyfftw  # noqa: F401
    except ImportError:
        return "numpy"
    return "fftw"


@contextlib.contextmanager
def abtem_settings(fft_threads: int = 1) -> Iterator[None]:
    """Eager float32 CPU evaluation, FFTW when available, no progress bars.

    FFTW plans with FFTW_ESTIMATE: FFTW_MEASURE (abTEM's default) times candidate
    algorithms at run time, so two processes can pick different ones and a sample would
    no longer be bit-for-bit a function of (seed, index). FFTW also reuses wisdom of a
    more rigorous planner for an ESTIMATE plan, so the process's wisdom is forgotten first
    (a MEASURE plan made earlier, e.g. by the naive-abTEM benchmark, would leak in).
    """
    if _fft_backend() == "fftw":
        import pyfftw

        pyfftw.forget_wisdom()
    settings = {
        "device": "cpu",
        "precision": "float32",
        "fft": _fft_backend(),
        "fftw.threads": int(fft_threads),
        "fftw.planning_effort": "FFTW_ESTIMATE",
        "dask.lazy": False,
        "diagnostics.progress_bar": False,
        "diagnostics.task_progress": False,
    }
    with abtem.config.set(settings):
        yield


def check_atoms(atoms: Atoms) -> Atoms:
    if not isinstance(atoms, Atoms):
        raise TypeError(f"atoms must be ase.Atoms, got {type(atoms).__name__}")
    cell = np.asarray(atoms.cell)
    if not np.allclose(cell, np.diag(np.diag(cell)), atol=1e-8) or np.any(
        np.diag(cell) <= 0
    ):
        raise ValueError("atoms must have an orthogonal cell with positive lengths (Å)")
    atoms = atoms.copy()
    atoms.calc = None
    return atoms


def check_energy(energy_ev: float) -> None:
    lo, hi = ENERGY_RANGE_EV
    if not lo <= energy_ev <= hi:
        raise ValueError(f"energy_ev={energy_ev:g} outside {lo:g}..{hi:g} eV")


def check_fov(fov_ang: FovAng, cell_xy: Sequence[float]) -> tuple:
    (x0, y0), (x1, y1) = ((float(a), float(b)) for a, b in fov_ang)
    lx, ly = float(cell_xy[0]), float(cell_xy[1])
    eps = 1e-6
    if not (-eps <= x0 < x1 <= lx + eps and -eps <= y0 < y1 <= ly + eps):
        raise ValueError(
            f"fov_ang=(({x0:g}, {y0:g}), ({x1:g}, {y1:g})) is not inside the specimen "
            f"cell (0..{lx:.4g}, 0..{ly:.4g}) Å"
        )
    return (x0, y0), (x1, y1)


def check_grid(grid: Sequence[int], name: str) -> tuple[int, int]:
    gx, gy = (int(n) for n in grid)
    if gx < 1 or gy < 1:
        raise ValueError(f"{name}={tuple(grid)} must be two positive integers")
    return gx, gy
