"""Multislice simulation of STEM measurements with abTEM (1.0.9 on the pinned stack, 1.0.11 on the modern one).

One concept per module: ``potential`` (an abTEM potential built from ``ase.Atoms``),
``label`` (the projected-potential label), ``probe`` (probe positions, the probe, batched
multislice over a scan), ``cbed`` and ``images`` (the detectors that turn exit waves into
the measurements stored in a sample, see the design notes, *Sample*), ``noise``,
``reference`` (the benchmark's reference points) and ``settings`` (abTEM settings, input
checks). The public functions:

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
potential is built; :func:`build_potential` (through :func:`check_sliced`, when it is built) checks that every
atom was assigned to a slice.

Performance
-----------
The potential of each frozen-phonon configuration is built once, turned into band-limited
transmission functions once, and all probe positions are propagated together in batches
(complex64, FFTW through pyfftw when installed, with plans cached between batches).
:func:`naive_abtem_cbed` (one ``probe.multislice`` call per position) and
:func:`fft_floor_cbed` (a bare ``scipy.fft`` loop) are the two reference points of the
benchmark.
"""

from simulation.multislice.cbed import cbed_stack
from simulation.multislice.images import default_detectors, stem_images
from simulation.multislice.noise import add_poisson_noise
from simulation.multislice.label import projected_potential
from simulation.multislice.potential import (build_potential, centred_configurations, check_sliced, configurations,
                                              num_slices)
from simulation.multislice.probe import probe_positions
from simulation.multislice.reference import fft_floor_cbed, naive_abtem_cbed
from simulation.multislice.settings import ABTEM_MISSLICES

__all__ = [
    "ABTEM_MISSLICES",
    "num_slices",
    "build_potential",
    "centred_configurations",
    "check_sliced",
    "configurations",
    "probe_positions",
    "default_detectors",
    "cbed_stack",
    "stem_images",
    "projected_potential",
    "add_poisson_noise",
    "naive_abtem_cbed",
    "fft_floor_cbed",
]
