"""Module for the probe and its scan: positions, aberrations, batched multislice over all positions."""

from __future__ import annotations

from typing import Mapping, Sequence

import abtem
import numpy as np
from abtem.antialias import AntialiasAperture
from abtem.core.fft import CachedFFTWConvolution, _new_fftw_object
from abtem.multislice import FresnelPropagator, conventional_multislice_step
from abtem.potentials.iam import PotentialArray

from simulation.multislice.potential import configurations, transmission_functions
from simulation.multislice.settings import FovAng, check_energy, check_grid

_BATCH_BYTES = 8 * 2**20  # wave functions per batch of probe positions (cache-sized)


def probe_positions(grid: Sequence[int], fov_ang: FovAng) -> np.ndarray:
    """Probe positions of a scan grid, in raster order (x fastest).

    Parameters
    ----------
    grid : (int, int)
        Number of positions ``(nx, ny)`` along x and y.
    fov_ang : ((x0, y0), (x1, y1))
        Field of view [Å]; each position is the centre of its scan pixel.

    Returns
    -------
    np.ndarray
        ``(ny * nx, 2)`` float64 positions ``(x, y)`` [Å]; row ``iy * nx + ix`` is
        ``(x0 + (ix + 1/2) * (x1 - x0) / nx, y0 + (iy + 1/2) * (y1 - y0) / ny)``,
        so ``reshape(ny, nx)`` gives an image with rows along y and columns along x.
    """
    (x0, y0), (x1, y1) = ((float(a), float(b)) for a, b in fov_ang)
    nx, ny = check_grid(grid, "grid")
    x = x0 + (np.arange(nx) + 0.5) * (x1 - x0) / nx
    y = y0 + (np.arange(ny) + 0.5) * (y1 - y0) / ny
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=-1)


def _aberrations(defocus_ang: float, cs_ang: float, extra: Mapping[str, float] | None = None) -> dict[str, float]:
    # abTEM: defocus = -C10; Cs = C30; ``extra``: further polar coefficients (C12, phi12 ...)
    # [Å, rad], Cs and defocus added to the named ones.
    out = {"C10": -float(defocus_ang), "C30": float(cs_ang)}
    for key, value in (extra or {}).items():
        out[key] = out.get(key, 0.0) + float(value)
    return out


def make_probe(
    potential: abtem.Potential | PotentialArray,
    energy_ev: float,
    convergence_mrad: float,
    defocus_ang: float,
    cs_ang: float,
    aberrations: Mapping[str, float] | None = None,
    tilt_mrad: Sequence[float] = (0.0, 0.0),
) -> abtem.Probe:
    check_energy(energy_ev)
    if convergence_mrad <= 0:
        raise ValueError(f"convergence_mrad={convergence_mrad} must be > 0")
    probe = abtem.Probe(
        semiangle_cutoff=float(convergence_mrad),
        energy=float(energy_ev),
        aberrations=_aberrations(defocus_ang, cs_ang, aberrations),
        tilt=(float(tilt_mrad[0]), float(tilt_mrad[1])),
    )
    probe.grid.match(potential)
    return probe


class _KeptFFTWPlans(CachedFFTWConvolution):
    """FFT convolution that keeps its FFTW plans from slice to slice.

    abTEM 1.0.9's ``CachedFFTWConvolution`` never records the shape it planned for, so
    it builds two new FFTW objects (and a scratch array) at every slice; here the
    plans are kept and only pointed at the current wave-function buffer.
    """

    def __call__(self, array, kernel, overwrite_x):
        if not overwrite_x:
            return super().__call__(array, kernel, overwrite_x)
        plans = self._fftw_objects
        try:
            if plans is None or array.shape != self._shape:
                raise ValueError("no plan for this shape")
            for plan in plans.values():
                plan.update_arrays(array, array)
        except ValueError:  # new shape or alignment: plan again
            plans = {name: _new_fftw_object(array, name) for name in ("fft2", "ifft2")}
            self._fftw_objects, self._shape = plans, array.shape
        out = plans["fft2"]()
        out *= kernel
        return plans["ifft2"]()


def _fresnel_propagator() -> FresnelPropagator:
    propagator = FresnelPropagator()
    propagator._cached_fftw_convolution = _KeptFFTWPlans()
    return propagator


def _batches(num: int, gpts: Sequence[int], batch_positions: int | None):
    if batch_positions is None:
        batch_positions = max(1, _BATCH_BYTES // (8 * int(np.prod(gpts))))
    for start in range(0, num, int(batch_positions)):
        yield slice(start, min(num, start + int(batch_positions)))


def multislice_scan(
    potential: abtem.Potential,
    probe: abtem.Probe,
    positions: np.ndarray,
    detectors: list,
    batch_positions: int | None,
) -> list[np.ndarray]:
    """Run multislice for all positions; return each detector's output, phonon-averaged.

    Each configuration's transmission functions are computed once and reused for every
    batch of probe positions; one Fresnel propagator (and its cached FFTW plans) serves
    all batches.
    """
    propagator, antialias = _fresnel_propagator(), AntialiasAperture()
    sums: list[np.ndarray] | None = None
    count = 0
    for config in configurations(potential):
        transmission = transmission_functions(config, probe.energy)
        slices = [transmission.get_chunk(i, i + 1) for i in range(len(transmission))]
        outputs: list[list[np.ndarray]] = [[] for _ in detectors]
        for batch in _batches(len(positions), probe.gpts, batch_positions):
            waves = probe.build(scan=abtem.CustomScan(positions[batch]), lazy=False)
            for transmission_slice in slices:
                waves = conventional_multislice_step(
                    waves, transmission_slice, propagator, antialias
                )
            for out, detector in zip(outputs, detectors):
                out.append(np.asarray(detector.detect(waves).array, dtype=np.float64))
        stacked = [np.concatenate(out) for out in outputs]
        sums = stacked if sums is None else [s + o for s, o in zip(sums, stacked)]
        count += 1
    return [s / count for s in sums]
