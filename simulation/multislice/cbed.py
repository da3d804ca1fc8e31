"""Module for 4D-STEM: pixelated diffraction patterns binned to k x k, one per probe position."""

from __future__ import annotations

from typing import Mapping, Sequence

import abtem
import numpy as np
from ase import Atoms

from simulation.multislice.potential import build_potential
from simulation.multislice.probe import make_probe, multislice_scan, probe_positions
from simulation.multislice.settings import FovAng, abtem_settings, check_atoms, check_fov


def _bin_matrix(centres_mrad: np.ndarray, max_angle_mrad: float, k: int) -> np.ndarray:
    """Overlap (k, n) of n detector pixels with k equal bins spanning +-max_angle."""
    width = centres_mrad[1] - centres_mrad[0]
    edges = np.linspace(-max_angle_mrad, max_angle_mrad, k + 1)
    lo = np.maximum(edges[:-1, None], centres_mrad[None] - width / 2)
    hi = np.minimum(edges[1:, None], centres_mrad[None] + width / 2)
    return np.clip(hi - lo, 0.0, None) / width


def pattern_geometry(probe: abtem.Probe, max_angle_mrad: float, k: int):
    """Validate the detector range; return the pixel-centre angles along kx and ky."""
    cutoff = min(probe.cutoff_angles)
    if not 0 < max_angle_mrad <= cutoff:
        finest = min(probe.sampling) * cutoff / max_angle_mrad
        raise ValueError(
            f"max_angle_mrad={max_angle_mrad:g} outside the simulated band limit "
            f"{cutoff:.1f} mrad; use sampling_ang <= {finest:.4f}"
        )
    gpts = probe._gpts_within_angle("cutoff")
    centres = [
        (np.arange(n) - n // 2) * d for n, d in zip(gpts, probe.angular_sampling)
    ]
    available = min(2 * int(max_angle_mrad // d) + 1 for d in probe.angular_sampling)
    if k > available:
        raise ValueError(
            f"k={k} larger than the pattern ({available} pixels within max_angle_mrad="
            f"{max_angle_mrad:g} at {max(probe.angular_sampling):.3f} mrad/pixel)"
        )
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    return centres


def bin_patterns(
    patterns: np.ndarray, centres: list[np.ndarray], max_angle_mrad: float, k: int
) -> np.ndarray:
    """Integrate (P, nkx, nky) patterns over k x k bins spanning +-max_angle -> (P, ky, kx)."""
    rx = _bin_matrix(centres[0], max_angle_mrad, k)
    ry = _bin_matrix(centres[1], max_angle_mrad, k)
    return np.einsum("ai,pij,bj->pba", rx, patterns, ry, optimize=True)


def cbed_stack(
    atoms: Atoms,
    *,
    energy_ev: float,
    convergence_mrad: float,
    grid: Sequence[int],
    fov_ang: FovAng,
    k: int,
    max_angle_mrad: float,
    sampling_ang: float,
    slice_thickness_ang: float,
    defocus_ang: float = 0.0,
    cs_ang: float = 0.0,
    phonon_rms_ang: float | Mapping[str, float] | None = None,
    num_phonon_configs: int = 1,
    seed: int = 0,
    z_offset_ang: float | None = None,
    batch_positions: int | None = None,
    fft_threads: int = 1,
) -> np.ndarray:
    """Simulate a 4D-STEM stack of binned CBED patterns.

    Parameters
    ----------
    atoms : ase.Atoms
        Specimen, orthogonal cell, beam along ``z``.
    energy_ev : float
        Beam energy [eV], 60-300 keV.
    convergence_mrad : float
        Probe convergence semi-angle [mrad].
    grid : (int, int)
        Probe positions ``(gx, gy)`` along x and y.
    fov_ang : ((x0, y0), (x1, y1))
        Field of view scanned [Å], inside the cell; see :func:`probe_positions`.
    k : int
        Output pattern size (pixels per side).
    max_angle_mrad : float
        Half-width of the recorded square of scattering angles [mrad]; must not exceed
        the band limit of the grid (about ``wavelength / (3 * sampling)``).
    sampling_ang, slice_thickness_ang, phonon_rms_ang, num_phonon_configs, seed, \
z_offset_ang
        See :func:`build_potential`.
    defocus_ang : float
        Probe defocus [Å], abTEM convention (``defocus = -C10``).
    cs_ang : float
        Spherical aberration ``C30`` [Å].
    batch_positions : int, optional
        Probe positions propagated together (default: 8 MiB of wave functions).
    fft_threads : int
        FFTW threads.

    Returns
    -------
    np.ndarray
        ``(gx * gy, k, k)`` float32, axes ``[p, ky, kx]`` with ``p = iy * gx + ix``
        (raster order, see :func:`probe_positions`), zero angle at the centre. Each
        value is the fraction of the incident beam falling in a bin of
        ``2 * max_angle_mrad / k`` mrad; a full pattern of a thin specimen sums to just
        under 1 (what is missing was scattered beyond ``max_angle_mrad``).
    """
    atoms = check_atoms(atoms)
    fov = check_fov(fov_ang, np.diag(atoms.cell))
    positions = probe_positions(grid, fov)
    with abtem_settings(fft_threads):
        potential = build_potential(
            atoms,
            sampling_ang=sampling_ang,
            slice_thickness_ang=slice_thickness_ang,
            phonon_rms_ang=phonon_rms_ang,
            num_phonon_configs=num_phonon_configs,
            seed=seed,
            z_offset_ang=z_offset_ang,
        )
        probe = make_probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang)
        centres = pattern_geometry(probe, max_angle_mrad, k)
        detector = abtem.PixelatedDetector(max_angle="cutoff")
        (patterns,) = multislice_scan(
            potential, probe, positions, [detector], batch_positions
        )
    return bin_patterns(patterns, centres, max_angle_mrad, k).astype(np.float32)
