"""An "experimental-like" test micrograph with its ground truth, for the demo.

A specimen the demo model never saw (its own distortion, a larger field of view, another
pixel size, shot noise), simulated with the same physics as the training data, saved the
way a microscope would save it: one HyperSpy file per detector with calibrated axes in
nm. The ground truth (label maps on the micrograph's own pixel grid, and the specimen's
parameters) goes beside it in ``truth.npz``.

``python -m simulation.micrograph OUT_DIR`` writes ``haadf.hspy``, ``abf.hspy``,
``truth.npz`` and ``README.md`` (what was simulated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from simulation import multislice
from simulation.labels import column_maps, find_columns
from simulation.structures import Material, build_specimen
from stemnet import __version__

SPECIMEN = dict(glazer="a0a0c+", tilt_deg=(0.0, 0.0, 8.0), polar_A_ang=(0.0, 0.0, 0.0),
                polar_B_ang=(0.10, -0.06, 0.0))
MATERIAL = Material("SrTiO3", "Sr", "Ti", "O", 3.905)


def make_micrograph(out: Path, *, cells: int = 4, thickness_cells: int = 4, pixels: int = 36,
                    dose_e_per_ang2: float = 2e5, seed: int = 7, sampling_ang: float = 0.055,
                    detectors=None, sigma_ang: float = 0.5) -> dict:
    """Simulate and save the micrograph; returns its description (also in truth.npz)."""
    import rsciio.hspy

    detectors = detectors or {"haadf": (60.0, 150.0), "abf": (10.0, 20.0)}
    specimen = build_specimen(MATERIAL, cells, thickness_cells, **SPECIMEN)
    size = float(np.diag(specimen.atoms.cell.array)[0])
    fov = ((0.0, 0.0), (size, size))
    images = multislice.stem_images(specimen.atoms, energy_ev=200e3, convergence_mrad=20.0, shape=(pixels, pixels),
                                    fov_ang=fov, sampling_ang=sampling_ang, slice_thickness_ang=MATERIAL.a / 2,
                                    detectors=detectors)
    pixel = size / pixels
    rng = np.random.default_rng(seed)
    noisy = multislice.add_poisson_noise(images, dose_e_per_ang2, pixel * pixel, rng)
    potential = multislice.projected_potential(specimen.atoms, shape=(pixels, pixels), fov_ang=fov,
                                               sampling_ang=sampling_ang, slice_thickness_ang=MATERIAL.a / 2)
    displacement, columns = column_maps(find_columns(specimen), cell_ang=(size, size), fov_ang=size,
                                        shape=(pixels, pixels), sigma_ang=sigma_ang)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in zip(detectors, noisy):
        axes = [{"name": axis, "size": pixels, "offset": 0.0, "scale": pixel / 10.0, "units": "nm",
                 "navigate": False} for axis in ("y", "x")]
        signal = {"data": image.astype(np.float32), "axes": axes,
                  "metadata": {"General": {"title": name.upper()}, "Signal": {"signal_type": ""}},
                  "original_metadata": {}, "tmp_parameters": {}, "attributes": {"_lazy": False},
                  "package_info": {"name": "stemnet", "version": __version__}, "learning_results": {}, "models": {}}
        rsciio.hspy.file_writer(str(out / f"{name}.hspy"), signal)
    description = {"material": MATERIAL.name, "a_ang": MATERIAL.a, "cells": cells, "thickness_cells": thickness_cells,
                   "pixel_size_ang": pixel, "pixels": pixels, "dose_e_per_ang2": dose_e_per_ang2,
                   "detectors_mrad": {k: list(v) for k, v in detectors.items()}, **{k: v for k, v in SPECIMEN.items()}}
    np.savez_compressed(out / "truth.npz", potential=potential, displacement=displacement, columns=columns,
                        description=json.dumps(description))
    return description


def truth_on_grid(shape, pixel_ang: float, *, cells: int = 4, thickness_cells: int = 4,
                  sigma_ang: float = 0.5) -> dict:
    """The micrograph's ground-truth label maps on another grid (e.g. a reconstruction's:
    ``shape`` pixels of ``pixel_ang`` from the field of view's corner), channels-last."""
    specimen = build_specimen(MATERIAL, cells, thickness_cells, **SPECIMEN)
    size = float(np.diag(specimen.atoms.cell.array)[0])
    displacement, columns = column_maps(find_columns(specimen), cell_ang=(size, size), fov_ang=shape[0] * pixel_ang,
                                        shape=tuple(shape), sigma_ang=sigma_ang)
    mask = np.repeat(columns, 3, axis=0)
    return {"displacement": np.moveaxis(displacement, 0, -1), "displacement_mask": np.moveaxis(mask, 0, -1),
            "a_ang": MATERIAL.a, "tilt_deg": SPECIMEN["tilt_deg"][2]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    description = make_micrograph(args.out)
    print(json.dumps(description, indent=1))


if __name__ == "__main__":
    main()
