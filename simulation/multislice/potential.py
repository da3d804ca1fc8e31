"""Module for the specimen potential: slicing, frozen phonons, transmission functions."""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import abtem
import numpy as np
import scipy.fft
from abtem.antialias import AntialiasAperture
from abtem.potentials.iam import PotentialArray, TransmissionFunction
from ase import Atoms

from simulation.multislice.settings import check_atoms


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
        or per chemical symbol. None (default) gives a static lattice. Atoms tagged
        with a column (``atoms.get_tags() > 0``, as
        :func:`simulation.structures.build_specimen` tags them) get column-centred
        configurations (:func:`centred_configurations`).
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
    atoms = check_atoms(atoms)
    thickness = float(atoms.cell[2, 2])
    n = num_slices(thickness, slice_thickness_ang)
    dz = thickness / n
    atoms = _shift_z(atoms, dz / 4 if z_offset_ang is None else float(z_offset_ang))
    source: Atoms | abtem.FrozenPhonons | abtem.AtomsEnsemble = atoms
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
        if atoms.get_tags().any():
            source = abtem.AtomsEnsemble(centred_configurations(source, atoms.get_tags()))
    return abtem.Potential(
        source,
        gpts=_fft_gpts(np.diag(atoms.cell), sampling_ang),
        slice_thickness=(dz,) * n,
        parametrization=parametrization,
        projection="infinite",
    )


def centred_configurations(phonons: abtem.FrozenPhonons, tags: np.ndarray) -> list[Atoms]:
    """abTEM's frozen-phonon configurations with each column's in-plane shift removed.

    A real exposure averages every probe position over many vibrations, so no column
    stands off its site; one frozen configuration of a column of n atoms stands off by
    σ/√n (σ = 0.09 Å, n = 2-6: 4-6 pm on an O column, as large as an octahedral tilt's
    O shift), and a network trained on such snapshots learns to shrink the shifts it
    sees. Here the in-plane displacements of the atoms of one column (same ``tags`` > 0)
    have their mean subtracted and are scaled by √(n/(n−1)), so every atom keeps its
    r.m.s. displacement σ (the thermal diffuse scattering) while the column's centroid
    stays on its static site; displacements along the beam and untagged atoms (tag 0,
    e.g. an amorphous layer) are abTEM's draws unchanged.
    """
    tags = np.asarray(tags)
    column = np.unique(tags, return_inverse=True)[1].ravel()
    count = np.bincount(column).astype(np.float64)
    scale = np.sqrt(count / np.maximum(count - 1, 1))
    on = (tags > 0) & (count[column] > 1)
    static = phonons.atoms.positions
    out = []
    for member in phonons.to_atoms_ensemble().trajectory:
        config = member.copy()
        shift = config.positions[:, :2] - static[:, :2]
        mean = np.stack([np.bincount(column, shift[:, k], len(count)) for k in range(2)], axis=1) / count[:, None]
        shift[on] = (shift[on] - mean[column[on]]) * scale[column[on], None]
        config.positions[:, :2] = static[:, :2] + shift
        out.append(config)
    return out


def check_sliced(potential: abtem.Potential) -> None:
    """Raise if abTEM's slicing dropped atoms (atoms at/above the top slice edge)."""
    sliced = potential.get_sliced_atoms()
    kept = sum(len(sliced.get_atoms_in_slices(i)) for i in range(len(sliced)))
    total = len(sliced.atoms)
    if kept != total:
        raise RuntimeError(
            f"abTEM slicing lost {total - kept} of {total} atoms (atoms at or above the "
            "top slice boundary); use a different z_offset_ang"
        )


def configurations(potential: abtem.Potential) -> Iterator[PotentialArray]:
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
        check_sliced(member)
        built = member.build(lazy=False)
        if built.array.ndim == 4:  # a one-configuration ensemble
            built = PotentialArray(
                built.array[0], slice_thickness=built.slice_thickness, extent=built.extent
            )
        yield built


def transmission_functions(potential: PotentialArray, energy_ev: float) -> TransmissionFunction:
    """Band-limited transmission functions exp(i sigma V) of all slices (complex64)."""
    transmission = potential.transmission_function(energy=energy_ev)
    return AntialiasAperture().bandlimit(transmission, in_place=True)
