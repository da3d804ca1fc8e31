"""Multislice simulation of STEM measurements with abTEM (1.0.9 on the pinned stack, 1.0.11 on the modern one).

One concept per function: an abTEM potential built from ``ase.Atoms``, a probe, and the
detectors that turn exit waves into the measurements stored in a sample (see the design
notes, *Sample*):

- :func:`cbed_stack` -- 4D-STEM: a ``gx x gy`` probe grid, each diffraction pattern
  cropped to ``max_angle_mrad`` and binned to ``k x k`` -> ``(P, k, k)`` float32;
- :func:`stem_images` -- annular detector images (BF, ABF, HAADF, ...) -> ``(D, H, W)``;
- :func:`projected_potential` -- the label map, ``(1, H, W)`` in V*Å;
- :func:`add_poisson_noise` -- shot noise at a given dose.

Conventions
-----------
Units are Å, eV and mrad, stated in every argument name.

Probe grids and image grids share one convention, given by :func:`probe_positions` and
matching the label maps of :mod:`simulation.labels`: a grid of ``nx x ny`` positions over
``fov_ang = ((x0, y0), (x1, y1))`` puts each position at the centre of its scan pixel,
``x = x0 + (ix + 1/2) * (x1 - x0) / nx`` and ``y = y0 + (iy + 1/2) * (y1 - y0) / ny``.
Stacks are in raster order, **y-major, x fastest**: pattern ``p = iy * nx + ix``.
Images ``(H, W)`` have rows along y and columns along x: pixel ``[iy, ix]``, H = ny,
W = nx. Binned diffraction patterns follow the same convention, rows along ky and
columns along kx: ``[ky, kx]`` (the transpose of abTEM's ``[kx, ky]``), with zero
scattering angle at the centre of the ``k x k`` array, so that one transform of the
real-space axes (a flip, a 90° rotation) acts on images and patterns alike.

Slicing and the abTEM slice-boundary bug
----------------------------------------
The potential uses the infinite projection (each atom's whole projected potential goes
to one slice) with the Lobato parametrization. The specimen thickness is cut into
``n = round(thickness / slice_thickness_ang)`` equal slices. abTEM 1.0.9 assigns atoms to
slices with ``np.digitize`` on floating-point slice edges, so an atom lying exactly on a
boundary (every atomic plane of a perovskite when the slices are ``a/2``) lands in
either neighbouring slice depending on rounding -- two planes in one slice, an empty
slice next to it -- and an atom at or above the top edge is silently dropped. abTEM
1.0.10 fixed both (abTEM PRs #262, #273), but the offset stays on every version: with the
bug gone, atoms of a plane on a boundary that a distortion (polar shift, tilt) moves
slightly below it go to the slice below, so a tiny displacement would split the plane
between two slices (measured without the offset on abTEM 1.0.11: 6.7e3 of the 9.8e3 V·Å³
of a BO2 plane moved a slice down for bench and tiny samples; the projected label did not
change). Every atom is therefore shifted along ``z`` by ``z_offset_ang`` (default: a
quarter slice, which puts each plane mid-slice) and wrapped back into the cell before the
potential is built; :func:`build_potential` then checks that every atom was assigned to
a slice.

Performance
-----------
The potential of each frozen-phonon configuration is built once, turned into band-limited
transmission functions once, and all probe positions are propagated together in batches
(complex64, FFTW through pyfftw when installed, with plans cached between batches).
:func:`naive_abtem_cbed` (one ``probe.multislice`` call per position) and
:func:`fft_floor_cbed` (a bare ``scipy.fft`` loop) are the two reference points of the
benchmark.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import abtem
import numpy as np
import scipy.fft
from abtem.antialias import AntialiasAperture, antialias_aperture
from abtem.core.energy import energy2sigma, energy2wavelength
from abtem.core.fft import CachedFFTWConvolution, _new_fftw_object
from abtem.core.grid import spatial_frequencies
from abtem.multislice import FresnelPropagator, conventional_multislice_step
from abtem.potentials.iam import PotentialArray, TransmissionFunction
from ase import Atoms
from scipy.ndimage import map_coordinates

# abTEM < 1.0.10 mis-slices atoms on slice boundaries and drops top-edge ones (module notes)
ABTEM_VERSION = tuple(int(p) for p in abtem.__version__.split(".")[:3])
ABTEM_MISSLICES = ABTEM_VERSION < (1, 0, 10)
# abTEM < 1.0.11 normalises aberrated PRISM probes by sum(a_k**2) (see _prism_normalization_fix);
# 1.0.11 uses sum(|a_k|**2) (1.0.10 still has the old line, read in its wheel)
ABTEM_PRISM_MISNORMALISES = ABTEM_VERSION < (1, 0, 11)

__all__ = [
    "num_slices",
    "build_potential",
    "probe_positions",
    "default_detectors",
    "cbed_stack",
    "stem_images",
    "projected_potential",
    "add_poisson_noise",
    "naive_abtem_cbed",
    "fft_floor_cbed",
]

FovAng = Sequence[Sequence[float]]

_ENERGY_RANGE_EV = (60e3, 300e3)
_BATCH_BYTES = 8 * 2**20  # wave functions per batch of probe positions (cache-sized)


# --------------------------------------------------------------------------- settings


def _fft_backend() -> str:
    try:
        import pyfftw  # noqa: F401
    except ImportError:
        return "numpy"
    return "fftw"


@contextlib.contextmanager
def _abtem_settings(fft_threads: int = 1) -> Iterator[None]:
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


# -------------------------------------------------------------------------- validation


def _check_atoms(atoms: Atoms) -> Atoms:
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


def _check_energy(energy_ev: float) -> None:
    lo, hi = _ENERGY_RANGE_EV
    if not lo <= energy_ev <= hi:
        raise ValueError(f"energy_ev={energy_ev:g} outside {lo:g}..{hi:g} eV")


def _check_fov(fov_ang: FovAng, cell_xy: Sequence[float]) -> tuple:
    (x0, y0), (x1, y1) = ((float(a), float(b)) for a, b in fov_ang)
    lx, ly = float(cell_xy[0]), float(cell_xy[1])
    eps = 1e-6
    if not (-eps <= x0 < x1 <= lx + eps and -eps <= y0 < y1 <= ly + eps):
        raise ValueError(
            f"fov_ang=(({x0:g}, {y0:g}), ({x1:g}, {y1:g})) is not inside the specimen "
            f"cell (0..{lx:.4g}, 0..{ly:.4g}) Å"
        )
    return (x0, y0), (x1, y1)


def _check_grid(grid: Sequence[int], name: str) -> tuple[int, int]:
    gx, gy = (int(n) for n in grid)
    if gx < 1 or gy < 1:
        raise ValueError(f"{name}={tuple(grid)} must be two positive integers")
    return gx, gy


# --------------------------------------------------------------------------- potential


def num_slices(thickness_ang: float, slice_thickness_ang: float) -> int:
    """Number of potential slices: ``round(thickness / slice_thickness)``, at least 1."""
    if slice_thickness_ang <= 0:
        raise ValueError(f"slice_thickness_ang={slice_thickness_ang} must be > 0")
    return max(1, int(round(thickness_ang / slice_thickness_ang)))


def _fft_gpts(extent_ang: Sequence[float], sampling_ang: float) -> tuple[int, int]:
    """Grid points at least as fine as ``sampling_ang``, rounded up to fast FFT sizes."""
    if sampling_ang <= 0:
        raise ValueError(f"sampling_ang={sampling_ang} must be > 0")
    return tuple(
        int(scipy.fft.next_fast_len(math.ceil(e / sampling_ang - 1e-9)))
        for e in extent_ang[:2]
    )


def _shift_z(atoms: Atoms, z_offset_ang: float) -> Atoms:
    """Translate atoms along z and wrap them back into [0, c)."""
    c = atoms.cell[2, 2]
    atoms.positions[:, 2] = np.mod(atoms.positions[:, 2] + z_offset_ang, c)
    atoms.positions[atoms.positions[:, 2] >= c, 2] = 0.0  # mod can round up to c
    return atoms


def _sigmas(atoms: Atoms, phonon_rms_ang: float | Mapping[str, float]):
    if isinstance(phonon_rms_ang, Mapping):
        missing = sorted(set(atoms.get_chemical_symbols()) - set(phonon_rms_ang))
        if missing:
            raise ValueError(f"phonon_rms_ang has no r.m.s. displacement for {missing}")
        return {k: float(v) for k, v in phonon_rms_ang.items()}
    return float(phonon_rms_ang)


def build_potential(
    atoms: Atoms,
    *,
    sampling_ang: float,
    slice_thickness_ang: float,
    phonon_rms_ang: float | Mapping[str, float] | None = None,
    num_phonon_configs: int = 1,
    seed: int = 0,
    z_offset_ang: float | None = None,
    parametrization: str = "lobato",
) -> abtem.Potential:
    """Build the (lazy) abTEM potential of a specimen.

    Parameters
    ----------
    atoms : ase.Atoms
        Specimen with an orthogonal cell; the beam runs along ``z``.
    sampling_ang : float
        Largest lateral grid spacing [Å]. The number of grid points is rounded up to a
        fast FFT size, so the real spacing is ``cell / gpts <= sampling_ang``.
    slice_thickness_ang : float
        Target slice thickness [Å]; the cell height is cut into
        ``round(c / slice_thickness_ang)`` equal slices.
    phonon_rms_ang : float or dict of str to float, optional
        Frozen-phonon r.m.s. displacement [Å] along each of x, y and z, for all atoms
        or per chemical symbol. None (default) gives a static lattice.
    num_phonon_configs : int
        Number of frozen-phonon configurations (ignored for a static lattice).
    seed : int
        Seed of the frozen-phonon displacements.
    z_offset_ang : float, optional
        Shift of all atoms along ``z`` before slicing [Å], default a quarter of the
        slice thickness; keeps atomic planes off slice boundaries (see module notes).
    parametrization : {'lobato', 'kirkland'}
        Atomic potential parametrization.

    Returns
    -------
    abtem.Potential
        Infinite-projection potential with ``ensemble_shape == (num_phonon_configs,)``
        when phonons are on, ``()`` otherwise.
    """
    atoms = _check_atoms(atoms)
    thickness = float(atoms.cell[2, 2])
    n = num_slices(thickness, slice_thickness_ang)
    dz = thickness / n
    atoms = _shift_z(atoms, dz / 4 if z_offset_ang is None else float(z_offset_ang))
    source: Atoms | abtem.FrozenPhonons = atoms
    if phonon_rms_ang is not None:
        if num_phonon_configs < 1:
            raise ValueError(f"num_phonon_configs={num_phonon_configs} must be >= 1")
        source = abtem.FrozenPhonons(
            atoms,
            num_configs=int(num_phonon_configs),
            sigmas=_sigmas(atoms, phonon_rms_ang),
            directions="xyz",
            seed=int(seed),
        )
    return abtem.Potential(
        source,
        gpts=_fft_gpts(np.diag(atoms.cell), sampling_ang),
        slice_thickness=(dz,) * n,
        parametrization=parametrization,
        projection="infinite",
    )


def _check_sliced(potential: abtem.Potential) -> None:
    """Raise if abTEM's slicing dropped atoms (atoms at/above the top slice edge)."""
    sliced = potential.get_sliced_atoms()
    kept = sum(len(sliced.get_atoms_in_slices(i)) for i in range(len(sliced)))
    total = len(sliced.atoms)
    if kept != total:
        raise RuntimeError(
            f"abTEM slicing lost {total - kept} of {total} atoms (atoms at or above the "
            "top slice boundary); use a different z_offset_ang"
        )


def _configurations(potential: abtem.Potential) -> Iterator[PotentialArray]:
    """Yield the built potential (S, nx, ny) of each frozen-phonon configuration.

    ``Potential.build(lazy=False)`` of abTEM 1.0.9 writes every configuration of a
    FrozenPhonons ensemble into index 0 and leaves the others zero, so the
    configurations are built one by one here.
    """
    if potential.ensemble_shape:
        members = (block.item() for _, _, block in potential.generate_blocks(1))
    else:
        members = iter([potential])
    for member in members:
        _check_sliced(member)
        built = member.build(lazy=False)
        if built.array.ndim == 4:  # a one-configuration ensemble
            built = PotentialArray(
                built.array[0], slice_thickness=built.slice_thickness, extent=built.extent
            )
        yield built


def _transmission(potential: PotentialArray, energy_ev: float) -> TransmissionFunction:
    """Band-limited transmission functions exp(i sigma V) of all slices (complex64)."""
    transmission = potential.transmission_function(energy=energy_ev)
    return AntialiasAperture().bandlimit(transmission, in_place=True)


# ------------------------------------------------------------------------------- probe


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
    nx, ny = _check_grid(grid, "grid")
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


def _probe(
    potential: abtem.Potential | PotentialArray,
    energy_ev: float,
    convergence_mrad: float,
    defocus_ang: float,
    cs_ang: float,
    aberrations: Mapping[str, float] | None = None,
    tilt_mrad: Sequence[float] = (0.0, 0.0),
) -> abtem.Probe:
    _check_energy(energy_ev)
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


def _multislice_scan(
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
    for config in _configurations(potential):
        transmission = _transmission(config, probe.energy)
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


# ------------------------------------------------------------------------ diffraction


def _bin_matrix(centres_mrad: np.ndarray, max_angle_mrad: float, k: int) -> np.ndarray:
    """Overlap (k, n) of n detector pixels with k equal bins spanning +-max_angle."""
    width = centres_mrad[1] - centres_mrad[0]
    edges = np.linspace(-max_angle_mrad, max_angle_mrad, k + 1)
    lo = np.maximum(edges[:-1, None], centres_mrad[None] - width / 2)
    hi = np.minimum(edges[1:, None], centres_mrad[None] + width / 2)
    return np.clip(hi - lo, 0.0, None) / width


def _pattern_geometry(probe: abtem.Probe, max_angle_mrad: float, k: int):
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


def _bin_patterns(
    patterns: np.ndarray, centres: list[np.ndarray], max_angle_mrad: float, k: int
) -> np.ndarray:
    """Integrate (P, nkx, nky) patterns over k x k bins spanning +-max_angle -> (P, ky, kx)."""
    rx = _bin_matrix(centres[0], max_angle_mrad, k)
    ry = _bin_matrix(centres[1], max_angle_mrad, k)
    return np.einsum("ai,pij,bj->pba", rx, patterns, ry, optimize=True)


# ----------------------------------------------------------------------------- public


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
    atoms = _check_atoms(atoms)
    fov = _check_fov(fov_ang, np.diag(atoms.cell))
    positions = probe_positions(grid, fov)
    with _abtem_settings(fft_threads):
        potential = build_potential(
            atoms,
            sampling_ang=sampling_ang,
            slice_thickness_ang=slice_thickness_ang,
            phonon_rms_ang=phonon_rms_ang,
            num_phonon_configs=num_phonon_configs,
            seed=seed,
            z_offset_ang=z_offset_ang,
        )
        probe = _probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang)
        centres = _pattern_geometry(probe, max_angle_mrad, k)
        detector = abtem.PixelatedDetector(max_angle="cutoff")
        (patterns,) = _multislice_scan(
            potential, probe, positions, [detector], batch_positions
        )
    return _bin_patterns(patterns, centres, max_angle_mrad, k).astype(np.float32)


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
    for config in _configurations(potential):
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
    atoms = _check_atoms(atoms)
    fov = _check_fov(fov_ang, np.diag(atoms.cell))
    shape = _check_grid(shape, "shape")
    if method not in ("multislice", "prism"):
        raise ValueError(f"method={method!r}: expected 'multislice' or 'prism'")
    if detectors is None:
        detectors = default_detectors(convergence_mrad)
    positions = probe_positions(shape[::-1], fov)
    with _abtem_settings(fft_threads):
        potential = build_potential(
            atoms,
            sampling_ang=sampling_ang,
            slice_thickness_ang=slice_thickness_ang,
            phonon_rms_ang=phonon_rms_ang,
            num_phonon_configs=num_phonon_configs,
            seed=seed,
            z_offset_ang=z_offset_ang,
        )
        probe = _probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang, aberrations, tilt_mrad)
        annular = _annular_detectors(detectors, probe)
        if method == "prism":
            images = _prism_scan(potential, probe, shape[::-1], fov, annular)
        else:
            images = _multislice_scan(
                potential, probe, positions, annular, batch_positions
            )
    return np.stack([im.reshape(shape) for im in images]).astype(np.float32)


def projected_potential(
    atoms: Atoms,
    *,
    shape: Sequence[int],
    fov_ang: FovAng,
    sampling_ang: float,
    slice_thickness_ang: float,
    z_offset_ang: float | None = None,
    positions_ang: np.ndarray | None = None,
) -> np.ndarray:
    """Projected electrostatic potential on an output grid, the regression label.

    The static (no phonon) abTEM potential of :func:`build_potential` summed over all
    slices, then sampled at the pixel positions of :func:`probe_positions` by periodic
    cubic-spline interpolation.

    Parameters
    ----------
    atoms : ase.Atoms
        Specimen, orthogonal cell.
    shape : (int, int)
        Output size ``(H, W)``, rows along y, columns along x.
    fov_ang : ((x0, y0), (x1, y1))
        Field of view [Å] inside the cell.
    sampling_ang, slice_thickness_ang, z_offset_ang
        See :func:`build_potential`.
    positions_ang : (H, W, 2) float, optional
        Sample there instead [Å] (anywhere: the cell is periodic); ``fov_ang`` is then
        not used.

    Returns
    -------
    np.ndarray
        ``(1, H, W)`` float32 projected potential [V*Å].
    """
    atoms = _check_atoms(atoms)
    shape = _check_grid(shape, "shape")
    if positions_ang is None:
        fov = _check_fov(fov_ang, np.diag(atoms.cell))
        positions_ang = probe_positions(shape[::-1], fov)
    with _abtem_settings():
        potential = build_potential(
            atoms,
            sampling_ang=sampling_ang,
            slice_thickness_ang=slice_thickness_ang,
            z_offset_ang=z_offset_ang,
        )
        (config,) = list(_configurations(potential))
        projected = np.asarray(config.array, dtype=np.float64).sum(axis=0)
    pixels = np.asarray(positions_ang, np.float64).reshape(-1, 2) / np.asarray(config.sampling)
    values = map_coordinates(projected, pixels.T, order=3, mode="grid-wrap")
    return values.reshape((1,) + shape).astype(np.float32)


def add_poisson_noise(
    x: np.ndarray,
    dose_e_per_ang2: float,
    pixel_area_ang2: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Shot noise for a given electron dose.

    Each probe position (scan pixel of area ``pixel_area_ang2``) receives
    ``N = dose_e_per_ang2 * pixel_area_ang2`` electrons. ``x`` holds fractions of the
    incident beam (the output of :func:`cbed_stack` or :func:`stem_images`), so the
    recorded counts are ``Poisson(N * x)``; they are returned divided by ``N``, on the
    scale of ``x`` (the noiseless limit is ``x``).

    Parameters
    ----------
    x : np.ndarray
        Non-negative noiseless intensities, fractions of the beam.
    dose_e_per_ang2 : float
        Electron dose [e/Å²].
    pixel_area_ang2 : float
        Area of one scan pixel [Å²], e.g. ``(fov_x / gx) * (fov_y / gy)``.
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    np.ndarray
        Noisy intensities, float32, shape of ``x``.
    """
    if dose_e_per_ang2 <= 0 or pixel_area_ang2 <= 0:
        raise ValueError(
            f"dose_e_per_ang2={dose_e_per_ang2} and pixel_area_ang2={pixel_area_ang2} "
            "must be > 0"
        )
    x = np.asarray(x, dtype=np.float64)
    if np.any(x < -1e-6):
        raise ValueError("x must be non-negative intensities")
    electrons = dose_e_per_ang2 * pixel_area_ang2
    counts = rng.poisson(np.clip(x, 0.0, None) * electrons)
    return (counts / electrons).astype(np.float32)


# ------------------------------------------------------------------ benchmark helpers


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
    atoms = _check_atoms(atoms)
    positions = probe_positions(grid, _check_fov(fov_ang, np.diag(atoms.cell)))
    with abtem.config.set({"diagnostics.progress_bar": False}):
        potential = build_potential(
            atoms, sampling_ang=sampling_ang, slice_thickness_ang=slice_thickness_ang
        )
        probe = _probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang)
        centres = _pattern_geometry(probe, max_angle_mrad, k)
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
    return _bin_patterns(np.concatenate(patterns), centres, max_angle_mrad, k).astype(
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
    atoms = _check_atoms(atoms)
    positions = probe_positions(grid, _check_fov(fov_ang, np.diag(atoms.cell)))
    with _abtem_settings(fft_threads):
        potential = build_potential(
            atoms, sampling_ang=sampling_ang, slice_thickness_ang=slice_thickness_ang
        )
        probe = _probe(potential, energy_ev, convergence_mrad, defocus_ang, cs_ang)
        centres = _pattern_geometry(probe, max_angle_mrad, k)
        (config,) = list(_configurations(potential))
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
    return _bin_patterns(intensity, centres, max_angle_mrad, k).astype(np.float32)
