"""Module for the two reference points of the simulation benchmark: naive abTEM and a bare FFT loop."""

from __future__ import annotations

from typing import Sequence

import abtem
import numpy as np
import scipy.fft
from abtem.antialias import antialias_aperture
from abtem.core.energy import energy2sigma, energy2wavelength
from abtem.core.grid import spatial_frequencies
from ase import Atoms

from simulation.multislice.cbed import bin_patterns, pattern_geometry
from simulation.multislice.potential import build_potential, configurations
from simulation.multislice.probe import make_probe, probe_positions
from simulation.multislice.settings import FovAng, abtem_settings, check_atoms, check_fov


def naive_abtem_cbed(
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
) -> np.ndarray:
    """Reference for the benchmark: the straightforward abTEM use.

    Same physics and output as :func:`cbed_stack` (static lattice), but one
    ``probe.multislice(potential, scan=position)`` call per probe position with
    abTEM's default settings (lazy, dask's default scheduler; only the progress bar is
    off), the unbuilt potential being rebuilt in every call.

    Returns
    -------
    np.ndarray
        ``(gx * gy, k, k)`` float32, as :func:`cbed_stack`.
    """
    atoms = check_atoms(atoms)
    positions = probe_positions(grid, check_fov(fov_ang, np.diag(atoms.cell)))
    with abtem.config.set({"diagnostics.progress_bar": False}):
        potential = build_potential(
            atoms, sampling_ang=sampling_ang, slice_thickness_ang=slice_thickness_ang
        )
        probe = make_probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang)
        centres = pattern_geometry(probe, max_angle_mrad, k)
        patterns = []
        for position in positions:
            measured = probe.multislice(
                potential,
                scan=tuple(position),
                detectors=abtem.PixelatedDetector(max_angle="cutoff"),
            )
            if hasattr(measured, "compute"):
                measured = measured.compute()
            patterns.append(np.asarray(measured.array, dtype=np.float64).reshape(
                (1,) + measured.array.shape[-2:]
            ))
    return bin_patterns(np.concatenate(patterns), centres, max_angle_mrad, k).astype(
        np.float32
    )


def fft_floor_cbed(
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
    fft_threads: int = 1,
) -> np.ndarray:
    """Reference for the benchmark: a bare ``scipy.fft`` multislice loop.

    All probe positions at once, complex64: transmission functions
    ``exp(i sigma V)`` from the same projected-potential slices and the same band
    limit, the Fresnel propagator ``exp(-i pi lambda dz k^2)``, the same initial
    probes, grid and slice count as :func:`cbed_stack` (static lattice).

    Returns
    -------
    np.ndarray
        ``(gx * gy, k, k)`` float32, as :func:`cbed_stack`.
    """
    atoms = check_atoms(atoms)
    positions = probe_positions(grid, check_fov(fov_ang, np.diag(atoms.cell)))
    with abtem_settings(fft_threads):
        potential = build_potential(
            atoms, sampling_ang=sampling_ang, slice_thickness_ang=slice_thickness_ang
        )
        probe = make_probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang)
        centres = pattern_geometry(probe, max_angle_mrad, k)
        (config,) = list(configurations(potential))
        psi = probe.build(scan=abtem.CustomScan(positions), lazy=False).array
    gpts, sampling = probe.gpts, probe.sampling
    dz = potential.slice_thickness[0]
    fft = {"overwrite_x": True, "workers": fft_threads}

    band = antialias_aperture(gpts, sampling, np)
    sigma = energy2sigma(energy_ev)
    transmission = np.exp(1j * sigma * np.asarray(config.array)).astype(np.complex64)
    transmission = scipy.fft.ifft2(scipy.fft.fft2(transmission, **fft) * band, **fft)
    kx, ky = spatial_frequencies(gpts, sampling, xp=np)
    k2 = kx[:, None] ** 2 + ky[None] ** 2
    wavelength = energy2wavelength(energy_ev)
    propagator = (np.exp(-1j * np.pi * wavelength * dz * k2) * band).astype(np.complex64)

    psi = np.array(psi, dtype=np.complex64)
    incident = np.sum(np.abs(scipy.fft.fft2(psi, workers=fft_threads)) ** 2, axis=(-2, -1))
    for t in transmission.astype(np.complex64):
        psi *= t
        psi = scipy.fft.fft2(psi, **fft)
        psi *= propagator
        psi = scipy.fft.ifft2(psi, **fft)
    intensity = np.abs(scipy.fft.fft2(psi, **fft)) ** 2 / incident[:, None, None]
    intensity = np.fft.fftshift(intensity, axes=(-2, -1))
    n = [len(c) for c in centres]
    lo = [g // 2 - m // 2 for g, m in zip(gpts, n)]
    intensity = intensity[:, lo[0] : lo[0] + n[0], lo[1] : lo[1] + n[1]]
    return bin_patterns(intensity, centres, max_angle_mrad, k).astype(np.float32)
