"""Projected potentials of the shipped simulation configs with the installed abTEM.

Usage: python tests/scripts/potential_reference.py OUT.npz [CONFIG...]
Writes, for sample 0 and 1 of the shipped configs/simulation/*.yaml (default: all but
paper.yaml, whose 48x48-cell supercell takes many minutes; name it to include it; static lattice, the
config's sampling, the generator's slices): the label map (``projected_potential`` over
the whole periodic cell on the config's output grid, (1, H, W) V*Å) and the potential summed over each slice's
area (S,) V*Å³ -- the per-slice totals show which slice every atom went to. Run once per
stack (abTEM 1.0.9 in .venv, 1.0.11 in .venv-modern); tests/test_abtem_versions.py
compares the installed abTEM against the stored file of the other version.
"""

import sys
from pathlib import Path

import abtem
import numpy as np

from simulation import multislice
from simulation.generator import draw_specimen, slice_thickness_ang
from simulation.config import load_simulation

REPO = Path(__file__).resolve().parents[2]
SAMPLES = (0, 1)
SLOW = ("paper",)  # ~0.7 M atoms per sample


def potentials(config_path: Path, index: int):
    cfg = load_simulation(config_path)
    specimen, _ = draw_specimen(cfg, index)
    slice_ang = slice_thickness_ang(specimen)
    cell = np.diag(specimen.atoms.cell.array)
    fov = ((0.0, 0.0), (float(cell[0]), float(cell[1])))  # the whole periodic cell
    label = multislice.projected_potential(specimen.atoms.copy(), shape=cfg.output_shape, fov_ang=fov,
                                           sampling_ang=cfg.sampling_ang, slice_thickness_ang=slice_ang)
    built = multislice.build_potential(specimen.atoms.copy(), sampling_ang=cfg.sampling_ang,
                                       slice_thickness_ang=slice_ang).build(lazy=False)
    area = float(np.prod(built.sampling))
    per_slice = np.asarray(built.array, np.float64).sum(axis=(-2, -1)) * area
    return label, per_slice.astype(np.float32)


def main(out: str, names=()) -> None:
    arrays = {"abtem_version": np.array(abtem.__version__)}
    shipped = sorted((REPO / "configs" / "simulation").glob("*.yaml"))
    for path in [p for p in shipped if (p.stem in names if names else p.stem not in SLOW)]:
        for index in SAMPLES:
            label, per_slice = potentials(path, index)
            arrays[f"{path.stem}/{index}/label"] = label
            arrays[f"{path.stem}/{index}/per_slice"] = per_slice
            print(f"{path.stem} sample {index}: label {label.shape}, {per_slice.size} slices", flush=True)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
