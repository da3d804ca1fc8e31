"""An "experimental-like" test micrograph with its ground truth, for the demo.

A specimen the demo model never saw (its own distortion, a larger field of view, another
pixel size, shot noise), simulated with the same physics as the training data, saved the
way a microscope would save it: one HyperSpy file per detector with calibrated axes in
nm. The ground truth (label maps on the micrograph's own pixel grid, and the specimen's
parameters) goes beside it in ``truth.npz``.

``python -m simulation.micrograph OUT_DIR`` writes the demo's micrograph
(``demo/micrograph``), a large image as an aberration-corrected instrument records it
(:func:`make_realistic_micrograph`: 288 x 288 pixels of 0.09 Å, out-of-plane tilts,
every imperfection of :mod:`simulation.stem` at values outside the ranges the demo trains
on): ``haadf.hspy``, ``abf.hspy`` and the same images as NCEM EMD (``haadf.emd``,
``abf.emd``), with its ground truth (tilt maps and probe positions; ``--full-truth`` adds
the label maps and noiseless images) in ``truth.npz``; :func:`realistic_specimen`
rebuilds its specimen from that file and :func:`realistic_label_maps` its label maps.

``python -m simulation.micrograph --small OUT_DIR`` writes the earlier 64 x 64 micrograph
at 0.244 Å (:func:`make_micrograph`).
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


def make_micrograph(out: Path, *, cells: int = 4, thickness_cells: int = 4, pixels: int = 64,
                    dose_e_per_ang2: float = 2e5, seed: int = 7, sampling_ang: float = 0.055,
                    detectors=None, sigma_ang: float = 0.5) -> dict:
    """Simulate and save the micrograph; returns its description (also in truth.npz).

    The images: the probe scanned at its Nyquist step over the 2 x 2 cell periodic
    supercell of the (uniformly distorted) crystal, Fourier-interpolated onto the
    ``pixels x pixels`` grid over ``cells`` cells (:func:`simulation.stem.record`).
    """
    from simulation import stem

    detectors = detectors or {"haadf": (60.0, 150.0), "abf": (10.0, 20.0)}
    specimen = build_specimen(MATERIAL, cells, thickness_cells, **SPECIMEN)
    periodic = build_specimen(MATERIAL, 2, thickness_cells, **SPECIMEN)
    size = float(np.diag(specimen.atoms.cell.array)[0])
    fov = ((0.0, 0.0), (size, size))
    cell = tuple(float(v) for v in np.diag(periodic.atoms.cell.array)[:2])
    images = stem.record(periodic.atoms, cell_ang=cell, positions_ang=stem.imaging.pixel_positions((pixels, pixels), size),
                         scan_step_ang=stem.imaging.nyquist_step_ang(200e3, 20.0), detectors=detectors, draws={},
                         energy_ev=200e3, convergence_mrad=20.0, sampling_ang=sampling_ang,
                         slice_thickness_ang=MATERIAL.a / 2)
    pixel = size / pixels
    rng = np.random.default_rng(seed)
    noisy = multislice.add_poisson_noise(images, dose_e_per_ang2, pixel * pixel, rng)
    potential = multislice.projected_potential(specimen.atoms, shape=(pixels, pixels), fov_ang=fov,
                                               sampling_ang=sampling_ang, slice_thickness_ang=MATERIAL.a / 2)
    displacement, columns = column_maps(find_columns(specimen), cell_ang=(size, size), fov_ang=size,
                                        shape=(pixels, pixels), sigma_ang=sigma_ang)
    save_images(out, detectors, noisy, pixel, energy_ev=200e3, convergence_mrad=20.0)
    description = {"material": MATERIAL.name, "a_ang": MATERIAL.a, "cells": cells, "thickness_cells": thickness_cells,
                   "pixel_size_ang": pixel, "pixels": pixels, "dose_e_per_ang2": dose_e_per_ang2,
                   "detectors_mrad": {k: list(v) for k, v in detectors.items()}, **{k: v for k, v in SPECIMEN.items()}}
    np.savez_compressed(out / "truth.npz", potential=potential, displacement=displacement, columns=columns,
                        description=json.dumps(description))
    return description


#: The held-out specimen and instrument of :func:`make_realistic_micrograph`: each
#: imperfection lies outside the range ``configs/simulation/demo.yaml`` draws from. The
#: drift, as the image shows it, is a strain: drift per line over the line spacing. At
#: 0.09 Å lines, 0.0025 and -0.002 Å/line are 2.8 % shear and 2.2 % stretch, beyond the
#: 2.05 % of the demo's ±0.005 Å/line at its 0.244 Å lines, yet square enough (≈1.6°) for
#: the reconstruction's [001] lattice check (90 ± 3°).
REALISTIC_SPECIMEN = dict(glazer="a-a-c+", tilt_deg=(4.0, 4.0, 8.0), polar_A_ang=(0.0, 0.0, 0.0),
                          polar_B_ang=(0.10, -0.06, 0.03))
REALISTIC_IMPERFECTIONS = dict(
    source_fwhm_ang=0.85, residual_defocus_ang=35.0, astigmatism_ang=25.0, astigmatism_angle_deg=35.0,
    coma_ang=250.0, coma_angle_deg=120.0, residual_cs_ang=12000.0, focal_spread_ang=55.0,
    mistilt_mrad=3.5, mistilt_angle_deg=30.0, amorphous_ang=0.0, jitter_ang=0.18,
    drift_x_ang_per_line=0.0025, drift_y_ang_per_line=-0.002, flyback_ang=0.35,
    dose_e_per_ang2=1.5e4, read_noise_e=1.5, gain=1.4, offset_frac=0.07,
)


def make_realistic_micrograph(out: Path, *, pixels: int = 288, pixel_size_ang: float = 0.09,
                              thickness_cells: int = 8, material: Material = MATERIAL,
                              specimen: dict | None = None, imperfections: dict | None = None,
                              detectors=None, energy_ev: float = 200e3, convergence_mrad: float = 20.0,
                              focal_points: int = 3, flyback_decay_px: float = 4.0, seed: int = 17,
                              sampling_ang: float = 0.055, sigma_ang: float = 0.5, compact: bool = False) -> dict:
    """Simulate a large held-out micrograph and its ground truth; returns its description.

    The crystal (uniformly distorted, so periodic in a 2 x 2 cell supercell) is scanned
    at the probe's Nyquist step over that supercell; the images are then summed as
    Fourier series at the ``pixels x pixels`` probe positions of a raster scan of
    ``pixel_size_ang`` moved by jitter, drift and flyback (so the field of view spans
    many cells and the distortions do not repeat), blurred by the source, with shot
    noise, read noise, gain and offset. Saved as ``haadf.hspy``/``abf.hspy`` (calibrated
    axes in nm, beam energy and convergence angle in the HyperSpy metadata) and
    ``truth.npz``: ``potential`` (1, H, W) V·Å, ``displacement`` (9, H, W) Å, ``columns``
    (3, H, W), ``tilt`` (3, H, W) deg, ``positions_ang`` (H, W, 2) where the probe landed,
    ``noiseless`` (D, H, W), and a JSON ``description`` of every value used, all float32.
    ``compact`` (the shipped demo micrograph: small committed files) leaves out
    ``displacement``, ``columns`` and ``noiseless``; :func:`realistic_label_maps` remakes
    the label maps from the rest.
    """
    from simulation import stem
    from simulation.labels import tilt_map

    detectors = detectors or {"haadf": (60.0, 150.0), "abf": (10.0, 20.0)}
    specimen = dict(REALISTIC_SPECIMEN, **(specimen or {}))
    draws = dict(REALISTIC_IMPERFECTIONS, **(imperfections or {}))
    spec = build_specimen(material, 2, thickness_cells, **specimen)
    cell = tuple(float(v) for v in np.diag(spec.atoms.cell.array)[:2])
    rng = np.random.default_rng(seed)
    positions = stem.scan_positions((pixels, pixels), pixels * pixel_size_ang, draws,
                                    flyback_decay_px=flyback_decay_px, rng=rng)
    slice_ang = spec.params["lattice_ang"][2] / 2
    nyquist = stem.imaging.nyquist_step_ang(energy_ev, convergence_mrad)
    noiseless = stem.record(spec.atoms, cell_ang=cell, positions_ang=positions, scan_step_ang=nyquist,
                            detectors=detectors, draws=draws, focal_points=focal_points, energy_ev=energy_ev,
                            convergence_mrad=convergence_mrad, sampling_ang=sampling_ang,
                            slice_thickness_ang=slice_ang, seed=seed)
    images = stem.detect_all(noiseless, draws, pixel_area_ang2=pixel_size_ang**2, dose_e_per_ang2=None, rng=rng)
    potential = multislice.projected_potential(spec.atoms, shape=(pixels, pixels), fov_ang=None,
                                               sampling_ang=sampling_ang, slice_thickness_ang=slice_ang,
                                               positions_ang=positions)
    displacement, columns = column_maps(find_columns(spec), cell_ang=cell, fov_ang=pixels * pixel_size_ang,
                                        shape=(pixels, pixels), sigma_ang=sigma_ang, positions_ang=positions)
    tilt = tilt_map(spec, positions)
    description = {"material": material.name, "sites": [material.A, material.B, material.X], "a_ang": material.a,
                   "lattice_ang": list(spec.params["lattice_ang"]),
                   "thickness_cells": thickness_cells, "pixel_size_ang": pixel_size_ang, "pixels": pixels,
                   "nyquist_step_ang": nyquist, "energy_ev": energy_ev, "convergence_mrad": convergence_mrad,
                   "detectors_mrad": {k: list(v) for k, v in detectors.items()}, "focal_points": focal_points,
                   "flyback_decay_px": flyback_decay_px, "seed": seed, "imperfections": draws,
                   **{k: v for k, v in specimen.items()}}
    save_images(out, detectors, images, pixel_size_ang, energy_ev=energy_ev, convergence_mrad=convergence_mrad,
                formats=("hspy", "emd"))
    truth = dict(potential=potential, tilt=tilt, positions_ang=positions)
    if not compact:
        truth.update(displacement=displacement, columns=columns, noiseless=noiseless)
    np.savez_compressed(out / "truth.npz", description=json.dumps(description),
                        **{k: np.asarray(v, np.float32) for k, v in truth.items()})
    return description


def realistic_label_maps(truth, sigma_ang: float = 0.5):
    """The label maps ``(displacement (9, H, W) Å, columns (3, H, W))`` of a
    :func:`make_realistic_micrograph` from its ``truth.npz`` (path or loaded), at the
    recorded probe positions (what a non-compact truth file holds)."""
    truth = np.load(truth) if isinstance(truth, (str, Path)) else truth
    description = json.loads(str(truth["description"]))
    spec = realistic_specimen(description)
    positions = np.asarray(truth["positions_ang"], np.float64)
    n = int(description["pixels"])
    return column_maps(find_columns(spec), cell_ang=tuple(np.diag(spec.atoms.cell.array)[:2]),
                       fov_ang=n * float(description["pixel_size_ang"]), shape=(n, n), sigma_ang=sigma_ang,
                       positions_ang=positions)


def realistic_specimen(description: dict):
    """The specimen of a :func:`make_realistic_micrograph` (its ``truth.npz`` description):
    the periodic 2 x 2 cell supercell the images were simulated from."""
    material = Material(description["material"], *description["sites"], description["a_ang"])
    return build_specimen(material, 2, int(description["thickness_cells"]),
                          **{k: tuple(description[k]) if k != "glazer" else description[k]
                             for k in REALISTIC_SPECIMEN})


def save_images(out: Path, detectors, images, pixel_ang: float, *, energy_ev=None, convergence_mrad=None,
                formats=("hspy",)) -> None:
    """One file per detector and format, axes calibrated in nm: HyperSpy (``hspy``, the
    beam energy (keV) and convergence semi-angle (mrad) in ``Acquisition_instrument.TEM``
    when given) and NCEM EMD (``emd``: rosettasciio's EMD writer, which keeps the axes and
    the title but not that metadata)."""
    import rsciio.emd
    import rsciio.hspy

    writers = {"hspy": rsciio.hspy.file_writer, "emd": rsciio.emd.file_writer}

    out.mkdir(parents=True, exist_ok=True)
    tem = {}
    if energy_ev is not None:
        tem["beam_energy"] = float(energy_ev) / 1e3
    if convergence_mrad is not None:
        tem["convergence_angle"] = float(convergence_mrad)
    for name, image in zip(detectors, images):
        pixels = image.shape
        axes = [{"name": axis, "size": size, "offset": 0.0, "scale": pixel_ang / 10.0, "units": "nm",
                 "navigate": False} for axis, size in zip(("y", "x"), pixels)]
        metadata = {"General": {"title": name.upper()}, "Signal": {"signal_type": ""}}
        if tem:
            metadata["Acquisition_instrument"] = {"TEM": dict(tem)}
        signal = {"data": np.asarray(image, np.float32), "axes": axes, "metadata": metadata,
                  "original_metadata": {}, "tmp_parameters": {}, "attributes": {"_lazy": False},
                  "package_info": {"name": "stemnet", "version": __version__}, "learning_results": {}, "models": {}}
        for fmt in formats:
            writers[fmt](str(out / f"{name}.{fmt}"), signal)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true",
                        help="the earlier 64 x 64 micrograph at 0.244 Å/pixel (default: the demo's 288 x 288 "
                             "micrograph at 0.09 Å/pixel with held-out imperfections)")
    parser.add_argument("--realistic", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    parser.add_argument("--full-truth", action="store_true",
                        help="also store the label maps and noiseless images in truth.npz (about 3 MB more)")
    args = parser.parse_args(argv)
    description = (make_micrograph(args.out) if args.small else
                   make_realistic_micrograph(args.out, compact=not args.full_truth))
    print(json.dumps(description, indent=1))


if __name__ == "__main__":
    main()
