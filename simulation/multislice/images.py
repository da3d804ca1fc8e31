"""Module for annular-detector STEM images (BF, ABF, HAADF, ...), by multislice or PRISM."""

from __future__ import annotations

from typing import Mapping, Sequence

import abtem
import numpy as np
from ase import Atoms

from simulation.multislice.potential import build_potential, configurations
from simulation.multislice.probe import make_probe, multislice_scan, probe_positions
from simulation.multislice.settings import ABTEM_PRISM_MISNORMALISES, FovAng, abtem_settings, check_atoms, check_fov, check_grid


def default_detectors(convergence_mrad: float) -> dict[str, tuple[float, float]]:
    """Typical annular detectors [mrad]: BF 0-alpha, ABF alpha/2-alpha, HAADF 70-200."""
    a = float(convergence_mrad)
    return {"bf": (0.0, a), "abf": (a / 2, a), "haadf": (70.0, 200.0)}


def _annular_detectors(
    detectors: Mapping[str, tuple[float, float]], probe: abtem.Probe
) -> list[abtem.AnnularDetector]:
    cutoff = min(probe.cutoff_angles)
    out = []
    for name, (inner, outer) in detectors.items():
        if not 0 <= inner < outer:
            raise ValueError(
                f"detector {name!r}: need 0 <= inner < outer mrad, got {inner}, {outer}"
            )
        if outer > cutoff:
            finest = min(probe.sampling) * cutoff / outer
            raise ValueError(
                f"detector {name!r} outer angle {outer:g} mrad beyond the simulated band "
                f"limit {cutoff:.1f} mrad; use sampling_ang <= {finest:.4f}"
            )
        out.append(abtem.AnnularDetector(inner=float(inner), outer=float(outer)))
    return out


def _prism_normalization_fix(s_matrix: abtem.SMatrix, ctf: abtem.CTF) -> float:
    """Intensity correction for abTEM 1.0.9's (and 1.0.10's) PRISM with an aberrated probe.

    abTEM normalises the plane-wave expansion coefficients ``a_k`` of the probe by
    ``sqrt(sum(a_k ** 2))`` instead of ``sqrt(sum(|a_k| ** 2))``; with any aberration
    the ``a_k`` are complex and every intensity comes out multiplied by
    ``sum(|a_k| ** 2) / |sum(a_k ** 2)|`` (about 2 for 20 Å of defocus at 300 keV).
    Returns the inverse of that factor (1 without aberrations); 1 on abTEM >= 1.0.11,
    which normalises by ``sum(|a_k| ** 2)`` itself.
    """
    if not ABTEM_PRISM_MISNORMALISES:
        return 1.0
    k = np.asarray(s_matrix.wave_vectors, dtype=np.float64)
    alpha = np.hypot(k[:, 0], k[:, 1]) * ctf.wavelength
    phi = np.arctan2(k[:, 1], k[:, 0])
    a = np.asarray(ctf._evaluate_from_angular_grid(alpha, phi), dtype=np.complex128)
    return float(abs(np.sum(a**2)) / np.sum(np.abs(a) ** 2))


def _prism_scan(
    potential: abtem.Potential,
    probe: abtem.Probe,
    grid: tuple[int, int],
    fov: tuple,
    detectors: list,
) -> list[np.ndarray]:
    """PRISM (S-matrix, interpolation 1) images in raster order, phonon-averaged."""
    (x0, y0), (x1, y1) = fov
    half = (0.5 * (x1 - x0) / grid[0], 0.5 * (y1 - y0) / grid[1])
    # the positions of probe_positions (CustomScan fails in abTEM 1.0.9's S-matrix)
    scan = abtem.GridScan(
        start=(x0 + half[0], y0 + half[1]),
        end=(x1 + half[0], y1 + half[1]),
        gpts=grid,
        endpoint=False,
    )
    ctf = abtem.CTF(
        semiangle_cutoff=probe.semiangle_cutoff,
        energy=probe.energy,
        aberration_coefficients=dict(probe.aberrations.aberration_coefficients),
    )
    sums, count = None, 0
    for config in configurations(potential):
        s_matrix = abtem.SMatrix(
            semiangle_cutoff=probe.semiangle_cutoff,
            energy=probe.energy,
            potential=config,
            downsample=False,
        )
        measured = s_matrix.scan(scan=scan, detectors=detectors, ctf=ctf, lazy=False)
        measured = measured if isinstance(measured, list) else [measured]
        scale = _prism_normalization_fix(s_matrix, ctf)
        arrays = [scale * np.asarray(m.array, np.float64).T.ravel() for m in measured]
        sums = arrays if sums is None else [s + a for s, a in zip(sums, arrays)]
        count += 1
    return [s / count for s in sums]


def stem_images(
    atoms: Atoms,
    *,
    energy_ev: float,
    convergence_mrad: float,
    shape: Sequence[int],
    fov_ang: FovAng,
    sampling_ang: float,
    slice_thickness_ang: float,
    detectors: Mapping[str, tuple[float, float]] | None = None,
    defocus_ang: float = 0.0,
    cs_ang: float = 0.0,
    aberrations: Mapping[str, float] | None = None,
    tilt_mrad: Sequence[float] = (0.0, 0.0),
    method: str = "multislice",
    phonon_rms_ang: float | Mapping[str, float] | None = None,
    num_phonon_configs: int = 1,
    seed: int = 0,
    z_offset_ang: float | None = None,
    batch_positions: int | None = None,
    fft_threads: int = 1,
) -> np.ndarray:
    """Simulate annular-detector STEM images of a field of view.

    Parameters
    ----------
    atoms, energy_ev, convergence_mrad, fov_ang, defocus_ang, cs_ang
        See :func:`cbed_stack`.
    shape : (int, int)
        Image size ``(H, W)``: H probe positions along y (rows), W along x (columns).
    detectors : dict of str to (float, float), optional
        Detector name -> (inner, outer) collection semi-angles [mrad], in output order.
        Default :func:`default_detectors` (BF, ABF, HAADF). The outer angle must lie
        within the band limit of the grid.
    aberrations : dict of str to float, optional
        Further abTEM polar aberration coefficients [Å; angles in rad], e.g.
        ``{"C12": 20.0, "phi12": 0.3, "C21": 100.0, "phi21": 1.0}``; ``C10`` and ``C30``
        add to ``-defocus_ang`` and ``cs_ang``.
    tilt_mrad : (float, float)
        Beam tilt against the specimen [mrad] (abTEM's tilted Fresnel propagator): a small
        crystal mistilt of the opposite sign.
    method : {'multislice', 'prism'}
        Batched probe multislice, or abTEM's PRISM (S-matrix without interpolation,
        which equals multislice to float precision). On a CPU PRISM is not faster for
        the small cells used here (measured: 49 vs 66 positions/s for a 24 x 24 scan
        of a 3 x 3 cell), because reducing the S-matrix costs a full-grid sum over all
        plane waves per position.
    sampling_ang, slice_thickness_ang, phonon_rms_ang, num_phonon_configs, seed, \
z_offset_ang, batch_positions, fft_threads
        See :func:`cbed_stack`.

    Returns
    -------
    np.ndarray
        ``(D, H, W)`` float32: the fraction of the incident beam on each detector,
        axes ``[detector, iy, ix]`` (see :func:`probe_positions`).
    """
    atoms = check_atoms(atoms)
    fov = check_fov(fov_ang, np.diag(atoms.cell))
    shape = check_grid(shape, "shape")
    if method not in ("multislice", "prism"):
        raise ValueError(f"method={method!r}: expected 'multislice' or 'prism'")
    if detectors is None:
        detectors = default_detectors(convergence_mrad)
    positions = probe_positions(shape[::-1], fov)
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
        probe = make_probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang, aberrations, tilt_mrad)
        annular = _annular_detectors(detectors, probe)
        if method == "prism":
            images = _prism_scan(potential, probe, shape[::-1], fov, annular)
        else:
            images = multislice_scan(
                potential, probe, positions, annular, batch_positions
            )
    return np.stack([im.reshape(shape) for im in images]).astype(np.float32)
