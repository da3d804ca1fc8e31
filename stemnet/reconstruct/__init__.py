"""Reconstruction of experimental micrographs with a trained run.

``stemnet reconstruct RUN INPUT... --out DIR`` (or :func:`reconstruct_files`):

1. **Read** (:mod:`.readers`, :mod:`.micrograph`): Velox EMD, DM3/DM4, MRC, TIFF
   (ImageJ/OME calibration), HyperSpy, HDF5, NumPy; 8/16/32-bit integer or float data;
   the pixel size from the file's axes or ``--pixel-size``. One image per run channel
   (``data.json`` ``input_channels``: any subset of detectors, HAADF-only included).
2. **Sampling** (:mod:`.preprocess`): an image finer than the run's sampling is
   anti-alias downsampled to it, whatever the factor; one coarser by more than 25 % is
   refused with the measured and expected values. Outliers are clipped to the
   [0.1, 99.9] percentiles; each channel's mean and std are matched to training.
3. **Lattice check** (:mod:`.lattice`): the cell measured from the image's Fourier
   transform and refined on the fitted columns must match a trained material within
   ±5 % and be square for [001], else a one-line refusal unless ``force``.
4. **Tiles and ensemble** (:mod:`.tiling`, :mod:`.ensemble`): half-overlapping tiles
   blended with a sin² window; the eight symmetries of the square give the mean and
   the spread (× the variance scale calibrated on the validation split, if any:
   :func:`calibrate_uncertainty`).
5. **Columns** (:mod:`.peaks`, :mod:`.columns`): peaks (scikit-image
   ``peak_local_max``), 2-D Gaussian fits (scipy least squares), A/B/O by lattice
   position and Z contrast; per column the network's dx, dy, dz with uncertainty and
   the Gaussian-fit position; per cell the polarisation [pm] and the tilt angles.
6. **Outputs** (:mod:`.outputs`, :mod:`.figures`): ``NAME.hspy`` (HyperSpy signals with
   calibrated axes, the column table, provenance), ``NAME_columns.csv``, ``NAME.png``.
"""

from stemnet.data.layout import tilt_vectors  # re-exported: the label layout owns it
from stemnet.reconstruct.calibration import calibrate_uncertainty, coverage
from stemnet.reconstruct.columns import SUBLATTICES, a_brighter, column_statistics, find_lattice_columns
from stemnet.reconstruct.ensemble import D4, d4_inverse, keras_predictor, tta_members
from stemnet.reconstruct.lattice import Lattice, check_lattice, fft_basis, fit_lattice
from stemnet.reconstruct.micrograph import Micrograph, load_micrograph
from stemnet.reconstruct.outputs import (DISPLACEMENT_CHANNELS, Reconstruction, write_columns_csv,
                                         write_hspy)
from stemnet.reconstruct.peaks import find_peaks, fit_gaussians
from stemnet.reconstruct.pipeline import (MIN_CELLS, Prepared, format_summary, load_uncertainty, prepare,
                                          reconstruct, reconstruct_files, run_info)
from stemnet.reconstruct.preprocess import (COARSER_LIMIT, check_sampling, clip_outliers, match_intensity,
                                            resample, resampled_shape)
from stemnet.reconstruct.readers import Image, parse_channel_map, pick_channels, read_images, sha256, unit_to_ang
from stemnet.reconstruct.tiling import OVERLAP, predict_tiled, tile_starts, tile_stride, window

__all__ = [
    "COARSER_LIMIT", "D4", "OVERLAP", "DISPLACEMENT_CHANNELS", "Image", "Lattice", "MIN_CELLS", "Micrograph", "Prepared",
    "Reconstruction", "SUBLATTICES", "a_brighter", "calibrate_uncertainty", "check_lattice", "check_sampling",
    "clip_outliers", "column_statistics", "coverage", "d4_inverse", "fft_basis", "find_lattice_columns",
    "find_peaks", "fit_gaussians", "fit_lattice", "format_summary", "keras_predictor", "load_micrograph",
    "load_uncertainty", "match_intensity", "parse_channel_map", "pick_channels", "predict_tiled", "prepare",
    "read_images", "reconstruct", "reconstruct_files", "resample", "resampled_shape", "run_info", "sha256",
    "tile_starts", "tile_stride", "tilt_vectors", "tta_members", "unit_to_ang", "window", "write_columns_csv", "write_hspy",
]
