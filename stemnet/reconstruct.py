"""Experimental micrograph → reconstruction with a trained run.

``stemnet reconstruct RUN INPUT... --out DIR`` reads STEM detector images (readers in
:mod:`stemnet.readers`), brings them to the sampling and intensity scale the run was
trained on, predicts the projected potential and the column displacement maps tile by
tile with a test-time-augmentation ensemble, measures per-column statistics, and writes
``DIR/<name>.hspy`` (HyperSpy HDF5 layout) and ``DIR/<name>.png``.

The steps, and the exact rules
------------------------------
1. **Channels.** The run's ``input_channels`` (``data.json``, e.g. ``["haadf", "abf"]``)
   decide what is needed: one file holding every channel (signal titles matched to the
   channel names case-insensitively, or a ``(C, H, W)`` stack in the run's channel
   order), or one file per channel (``channels={"haadf": a, "abf": b}``). All channels
   must have the same shape and pixel size (within 1 %).
2. **Calibration.** The pixel size (Å) comes from the file's axes (units Å/"A"/angstrom,
   nm, pm, µm), or from ``pixel_size`` (which overrides the file). Images whose pixel
   size is outside ``SAMPLING_RANGE`` × the training pixel size (0.5–2×) are refused:
   finer images would lose most of their information in the resampling, coarser ones
   would need structure the network never saw resolved.
3. **Non-finite pixels** (NaN/Inf) are refused unless ``fill_nan``: then they take the
   median of the finite pixels of their channel.
4. **Outliers.** Each channel is clipped to its [0.1, 99.9] percentiles (dead and hot
   pixels, cosmic rays; percentiles taken as pixel values inside the range, so at least
   the most extreme pixel at each end is clipped), before resampling so that a hot
   pixel is not smeared.
5. **Resampling** to the training pixel size ``p`` (``data.json`` ``pixel_size_ang`` =
   fov / output width; in STEM mode the input images and the maps share that grid):
   the output grid covers the image from its edge, pixel ``j`` at ``(j + ½)·p`` Å,
   ``floor(extent / p)`` pixels per axis, matching how the training images were
   sampled (probe positions at pixel centres). When shrinking (input pixel ``q < p``)
   a Gaussian anti-alias filter of σ = ``(p/q − 1)/2`` input pixels is applied first;
   values are then cubic B-spline interpolated (``scipy.ndimage.map_coordinates``,
   order 3, ``mode="reflect"``). An image already at the training sampling (within
   1e-6) is not interpolated.
6. **Intensity** (``intensity="match"``, the default): the absolute scale of an
   experiment never matches a simulation (detector gain, offset, collection
   efficiency), so each channel's mean ``m`` and standard deviation ``s`` (after steps
   4–5) are matched to the training set's per-detector statistics ``(μ, σ)``:
   ``x' = μ + σ·(x − m)/s``; the run's :class:`~stemnet.data.Normalization` then turns
   ``x'`` into the network input exactly as in training (``(x' − μ)/σ``), so the
   network sees the image standardised to zero mean and unit variance per channel.
   ``intensity="raw"`` skips the matching, for images already in simulation units
   (fractions of the incident beam).
7. **Tiling.** The model's input size (the training field) is the tile. An image larger
   than a tile along an axis is reflect-padded by half a tile and covered by tiles at
   a stride of half a tile (the last one flush with the padded edge); predictions are
   blended with the separable window ``w(k) = sin²(π(k + ½)/T)`` (never zero; for a
   stride of T/2 neighbouring windows sum to one) normalised by the summed weights,
   then the padding is cropped. An axis exactly one tile long is a single pass; an
   image smaller than a tile is reflect-padded to it, and refused below
   ``MIN_TILE_FRACTION`` (half) of a tile.
8. **Uncertainty.** The eight symmetries of the square (:func:`stemnet.data.d4_array`;
   displacement channels transformed as vectors by :func:`stemnet.data.d4_vectors`)
   are applied to the image; each prediction is mapped back by the inverse element
   (closed form, :func:`stemnet.data.layout.d4_inverse`). The reconstruction is the mean
   of the eight; the uncertainty is their standard deviation (ddof 0) per pixel.
9. **Columns.** Atomic columns are local maxima of the HAADF image (at the training
   sampling, smoothed with σ = 0.25 Å, at least 0.35·a apart, above the image median),
   refined by an intensity-weighted centroid in a disk of radius 0.25·a that follows
   the estimate (sub-pixel, six rounds). A square lattice
   fitted to them (nearest-neighbour A–B vectors at a/√2 give a and the orientation)
   sorts them into two sublattices by parity; the brighter one is A when the run's
   materials have Z(A) ≥ Z(B) (all the usual perovskites), else B. Non-B-site O
   columns are the midpoints of neighbouring B–B pairs (0.75–1.25 a apart). At every
   column the maps are read (bilinear): displacement of its sublattice (dx, dy, dz, Å)
   with its TTA spread, and the potential. Per sublattice: count, mean displacement,
   mean |d|. Tilt about the beam (as :func:`stemnet.evaluate.tilt_about_beam`):
   θ = atan(2·rms|d_xy(O)|/a), a measured from the lattice; its spread is the standard
   deviation of the per-column angles atan(2|d_xy|/a) over the O columns (the TTA
   spread of θ is stored too).

Output
------
``<name>.hspy`` (written to a temporary file, then ``os.replace``): HyperSpy signals
under ``/Experiments`` — ``input`` (C, H, W: the clipped, resampled input), ``potential``
and ``potential_std`` (V·Å), ``displacement`` and ``displacement_std`` (9, H, W: Å,
channels A_dx … O_dz) — with axes in Å (pixel ``i`` at ``offset + i·scale``, offset =
scale/2); ``/stemnet/columns`` (one row per column: ``x_ang``, ``y_ang``,
``sublattice`` 0 = A, 1 = B, 2 = O, ``intensity``, ``dx_ang`` …, ``std_dx_ang`` …,
``potential``, ``lattice_dx_ang``, ``lattice_dy_ang``: the offset from the fitted A
lattice, a classical cross-check); ``/stemnet/summary`` and the provenance in the
attributes of ``/stemnet`` (run path, config, data.json, normalisation, input files and
their SHA-256, stemnet version, every rule above with its parameters).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from stemnet import __version__
from stemnet.data.layout import DISPLACEMENT_CHANNELS, ELEMENTS, SUBLATTICES, d4_inverse  # noqa: F401
from stemnet.errors import UserError
from stemnet.log import get_logger
from stemnet.readers import Image, parse_channel_map, pick_channels, read_images, sha256

log = get_logger("reconstruct")

SAMPLING_RANGE = (0.5, 2.0)  # accepted input pixel size / training pixel size
CLIP_PERCENTILES = (0.1, 99.9)
MIN_TILE_FRACTION = 0.5  # smallest image, per axis, as a fraction of the tile
CALIBRATION_TOLERANCE = 0.01  # relative pixel-size disagreement allowed between channels
D4 = ELEMENTS  # (transpose, flip_y, flip_x)
INTENSITY_RULES = ("match", "raw")
Predictor = Callable[[np.ndarray], Dict[str, np.ndarray]]


# ============================================================================ inputs
@dataclass
class Micrograph:
    """Raw detector images of one field of view, one per run channel."""

    data: np.ndarray  # (C, H, W) float64, the run's channel order
    pixel_size_ang: Tuple[float, float]  # (y, x)
    channels: List[str]
    sources: List[dict]  # per channel: channel, file, title, sha256
    name: str
    calibration: str  # "file" or "--pixel-size"
    filled: int = 0  # non-finite pixels replaced (fill_nan)


def load_micrograph(inputs: Union[str, Path, Mapping[str, Union[str, Path]]], channels: Sequence[str], *,
                    dataset: Optional[str] = None, pixel_size: Optional[float] = None,
                    fill_nan: bool = False, name: Optional[str] = None) -> Micrograph:
    """Read the images of one field of view for a run with input ``channels``.

    ``inputs``: one file holding every channel, or ``{channel: file}`` (a string
    ``"haadf=a.dm4,abf=b.dm4"`` is parsed). Checks shapes, calibration and finiteness.
    """
    channels = [c.lower() for c in channels]
    if isinstance(inputs, str) and "=" in inputs and not Path(inputs).is_file():
        inputs = parse_channel_map(inputs)
    if isinstance(inputs, Mapping):
        mapping = {str(k).lower(): Path(v) for k, v in inputs.items()}
        if set(mapping) != set(channels):
            missing = [c for c in channels if c not in mapping]
            extra = [c for c in mapping if c not in channels]
            raise UserError(f"--channels {','.join(mapping)}: the run expects channels {channels}"
                            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        picked: List[Image] = []
        for channel in channels:
            images = read_images(mapping[channel], dataset)
            picked += pick_channels(images, [channel], str(mapping[channel]))
        files = [mapping[c] for c in channels]
    else:
        path = Path(inputs)
        picked = pick_channels(read_images(path, dataset), channels, str(path))
        files = [path] * len(channels)
    shapes = {tuple(im.data.shape) for im in picked}
    if len(shapes) != 1:
        raise UserError(f"{files[0]}: channel images differ in shape "
                        + ", ".join(f"{c} {im.data.shape}" for c, im in zip(channels, picked))
                        + "; expected one field of view")
    if pixel_size is not None:
        if not (math.isfinite(pixel_size) and pixel_size > 0):
            raise UserError(f"--pixel-size {pixel_size}: expected a positive length in Å")
        pixel, calibration = (float(pixel_size), float(pixel_size)), "--pixel-size"
    else:
        for c, im, f in zip(channels, picked, files):
            if im.pixel_size_ang is None:
                raise UserError(f"{f}: no pixel-size calibration for channel {c!r} ({im.title!r}); "
                                "give --pixel-size (Å per pixel)")
        pixel = picked[0].pixel_size_ang
        for c, im in zip(channels, picked):
            if not np.allclose(im.pixel_size_ang, pixel, rtol=CALIBRATION_TOLERANCE, atol=0):
                raise UserError(f"{files[0]}: channels disagree on the pixel size ({channels[0]} {pixel} Å, "
                                f"{c} {im.pixel_size_ang} Å); give --pixel-size to override")
        calibration = "file"
    data = np.stack([np.asarray(im.data, np.float64) for im in picked])
    filled = 0
    for c, f in enumerate(files):
        bad = ~np.isfinite(data[c])
        if bad.any():
            if bad.all():
                raise UserError(f"{f}: channel {channels[c]!r} has no finite pixel")
            if not fill_nan:
                raise UserError(f"{f}: {int(bad.sum())} NaN/Inf pixel(s) in channel {channels[c]!r}; "
                                "pass --fill-nan to replace them by the channel's median")
            data[c][bad] = np.median(data[c][~bad])
            filled += int(bad.sum())
    digests = {Path(f).resolve(): sha256(f) for f in set(files)}
    sources = [{"channel": c, "file": str(Path(f).resolve()), "title": im.title, "sha256": digests[Path(f).resolve()]}
               for c, im, f in zip(channels, picked, files)]
    return Micrograph(data, (float(pixel[0]), float(pixel[1])), list(channels), sources,
                      name or Path(files[0]).stem, calibration, filled)


# ========================================================================= sampling
def check_sampling(pixel_size_ang: Tuple[float, float], training_ang: float, where: str = "input") -> None:
    """Refuse a pixel size outside ``SAMPLING_RANGE`` × the training pixel size."""
    lo, hi = (training_ang * f for f in SAMPLING_RANGE)
    for axis, value in zip("yx", pixel_size_ang):
        if not lo <= value <= hi:
            raise UserError(f"{where}: pixel size {value:.4g} Å ({axis}) is outside the range this run can "
                            f"reconstruct, {lo:.4g}–{hi:.4g} Å ({SAMPLING_RANGE[0]}–{SAMPLING_RANGE[1]}× its "
                            f"training sampling {training_ang:.4g} Å); check the calibration or --pixel-size")


def clip_outliers(data: np.ndarray, percentiles=CLIP_PERCENTILES) -> np.ndarray:
    """Each channel of ``(C, H, W)`` clipped to its [lo, hi] percentiles, taken as pixel values
    inside the range (``method="higher"`` / ``"lower"``), so that at least the single most
    extreme pixel at each end is clipped even in a small image."""
    out = np.empty_like(data, dtype=np.float64)
    for c in range(data.shape[0]):
        lo = np.percentile(data[c], percentiles[0], method="higher")
        hi = np.percentile(data[c], percentiles[1], method="lower")
        np.clip(data[c], lo, hi, out=out[c])
    return out


def resampled_shape(shape: Tuple[int, int], pixel_in: Tuple[float, float], pixel_out: float) -> Tuple[int, int]:
    """Pixels of the training-sampling grid that fit in the image: ``floor(extent / p)``
    (to within 1e-3 pixel: calibrations stored in single precision are not exact)."""
    return tuple(int(math.floor(n * q / pixel_out + 1e-3)) for n, q in zip(shape, pixel_in))


def resample(data: np.ndarray, pixel_in: Tuple[float, float], pixel_out: float) -> np.ndarray:
    """``(C, H, W)`` images at pixel size ``pixel_in`` (y, x) → pixel size ``pixel_out``.

    Output pixel ``j`` samples ``(j + ½)·pixel_out`` from the image edge; see the module
    notes (anti-alias Gaussian when shrinking, cubic B-spline interpolation).
    """
    from scipy import ndimage

    shape = resampled_shape(data.shape[1:], pixel_in, pixel_out)
    if shape == tuple(data.shape[1:]) and np.allclose(pixel_in, pixel_out, rtol=1e-6, atol=0):
        return np.array(data, np.float64)
    coords = [(np.arange(n) + 0.5) * pixel_out / q - 0.5 for n, q in zip(shape, pixel_in)]
    grid = np.meshgrid(*coords, indexing="ij")
    sigma = [max(0.0, (pixel_out / q - 1.0) / 2.0) for q in pixel_in]
    out = np.empty((data.shape[0],) + shape, np.float64)
    for c in range(data.shape[0]):
        image = np.asarray(data[c], np.float64)
        if max(sigma) > 0:
            image = ndimage.gaussian_filter(image, sigma, mode="reflect")
        out[c] = ndimage.map_coordinates(image, grid, order=3, mode="reflect")
    return out


def match_intensity(data: np.ndarray, norm, rule: str = "match", where: str = "input") -> np.ndarray:
    """``(C, H, W)`` raw images → ``(H, W, C)`` float32 network inputs (module notes, step 6)."""
    if rule not in INTENSITY_RULES:
        raise UserError(f"intensity {rule!r}: expected one of {list(INTENSITY_RULES)}")
    x = np.moveaxis(np.asarray(data, np.float64), 0, -1).copy()
    if rule == "match":
        mean, std = np.asarray(norm.channel_mean, float), np.asarray(norm.channel_std, float)
        if len(mean) != x.shape[-1]:
            raise UserError(f"{where}: the run's normalisation has statistics for {len(mean)} channel(s), "
                            f"the input has {x.shape[-1]}")
        m = x.mean(axis=(0, 1))
        s = x.std(axis=(0, 1))
        if np.any(s <= 0):
            raise UserError(f"{where}: channel {int(np.argmin(s))} is constant; expected an image with contrast")
        x = mean + std * (x - m) / s
    return norm.inputs(x.astype(np.float32), channels_last=True)


# ========================================================================== tiling
def window(length: int) -> np.ndarray:
    """``sin²(π(k + ½)/T)``: positive everywhere; shifted by T/2 it sums to one."""
    k = np.arange(length)
    return np.sin(np.pi * (k + 0.5) / length) ** 2


def tile_starts(length: int, tile: int) -> List[int]:
    """Tile origins along an axis of ``length`` ≥ ``tile``: stride ``tile // 2``, last flush."""
    if length <= tile:
        return [0]
    stride = max(1, tile // 2)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _pad_plan(length: int, tile: int) -> Tuple[int, int]:
    if length == tile:
        return 0, 0
    if length < tile:
        before = (tile - length) // 2
        return before, tile - length - before
    margin = max(1, tile // 2)
    return margin, margin


def predict_tiled(predict: Predictor, image: np.ndarray, tile: Optional[Tuple[int, int]],
                  batch_size: int = 64) -> Dict[str, np.ndarray]:
    """Predict ``(H, W, C)`` with ``predict`` on overlapping tiles and blend the outputs.

    ``predict`` maps ``(N, th, tw, C)`` float32 to ``{head: (N, th, tw, K)}``; ``tile=None``
    means one pass over the whole image (for models that take any size).
    """
    h, w, _ = image.shape
    if tile is None:
        out = predict(np.ascontiguousarray(image[None], np.float32))
        return {k: np.asarray(v[0], np.float32) for k, v in out.items()}
    th, tw = (int(t) for t in tile)
    (py0, py1), (px0, px1) = _pad_plan(h, th), _pad_plan(w, tw)
    padded = np.pad(image, ((py0, py1), (px0, px1), (0, 0)), mode="reflect") if py0 + py1 + px0 + px1 else image
    ph, pw, _ = padded.shape
    ys, xs = tile_starts(ph, th), tile_starts(pw, tw)
    weight = np.outer(window(th) if len(ys) > 1 else np.ones(th), window(tw) if len(xs) > 1 else np.ones(tw))
    weight = weight.astype(np.float64)[..., None]
    acc: Dict[str, np.ndarray] = {}
    wsum = np.zeros((ph, pw, 1), np.float64)
    origins = [(y, x) for y in ys for x in xs]
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        batch = np.stack([padded[y:y + th, x:x + tw] for y, x in chunk]).astype(np.float32)
        out = predict(batch)
        for key, value in out.items():
            value = np.asarray(value, np.float64)
            if value.shape[1:3] != (th, tw):
                raise UserError(f"model output {key!r} is {value.shape[1:3]} per tile; expected the tile's {(th, tw)}")
            if key not in acc:
                acc[key] = np.zeros((ph, pw, value.shape[-1]), np.float64)
            for (y, x), v in zip(chunk, value):
                acc[key][y:y + th, x:x + tw] += weight * v
        for y, x in chunk:
            wsum[y:y + th, x:x + tw] += weight
    return {k: (v / wsum)[py0:py0 + h, px0:px0 + w].astype(np.float32) for k, v in acc.items()}


# ============================================================================ TTA
def _apply(element, maps: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A symmetry applied to ``{head: (H, W, K)}`` maps; 9-channel displacement as vectors."""
    from stemnet.data import d4_array, d4_vectors

    out = {}
    for key, value in maps.items():
        moved = d4_array(value, element, axes=(0, 1))
        if key == "displacement":
            moved = d4_vectors(moved, element, channel_axis=-1)
        out[key] = np.ascontiguousarray(moved)
    return out


def tta_members(predict: Predictor, image: np.ndarray, tile: Optional[Tuple[int, int]], *, tta: bool = True,
                batch_size: int = 64, progress: bool = False) -> List[Dict[str, np.ndarray]]:
    """One prediction per symmetry (8, or 1 without TTA), each mapped back to the image frame."""
    elements = D4 if tta else ((0, 0, 0),)
    members = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(elements), desc="reconstruct", unit="symmetry", leave=False)
    for g in elements:
        moved = np.ascontiguousarray(_apply(g, {"input": image})["input"])
        out = predict_tiled(predict, moved, tile, batch_size=batch_size)
        members.append(_apply(d4_inverse(g), out))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return members


def keras_predictor(model, batch_size: int = 64) -> Predictor:
    """``predict`` for a Keras model with a dict of outputs (eager, inference mode)."""

    def predict(x: np.ndarray) -> Dict[str, np.ndarray]:
        parts: Dict[str, list] = {}
        for start in range(0, len(x), batch_size):
            out = model(x[start:start + batch_size], training=False)
            if not isinstance(out, dict):
                out = {"potential": out}
            for key, value in out.items():
                parts.setdefault(key, []).append(np.asarray(value, np.float32))
        return {k: np.concatenate(v) for k, v in parts.items()}

    return predict


# ========================================================================= columns
def _local_maxima(image: np.ndarray, radius_px: float, threshold: float) -> np.ndarray:
    from scipy import ndimage

    r = max(1, int(math.floor(radius_px)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    footprint = yy**2 + xx**2 <= radius_px**2
    peak = (image == ndimage.maximum_filter(image, footprint=footprint, mode="nearest")) & (image > threshold)
    return np.argwhere(peak).astype(np.float64)


def _centroid(image: np.ndarray, points: np.ndarray, radius_px: float, rounds: int = 6) -> np.ndarray:
    """Intensity-weighted centroids in a disk that moves with the estimate (the image is
    interpolated at sub-pixel offsets, so a symmetric peak is found without bias)."""
    from scipy import ndimage

    step = 0.5
    r = int(math.ceil(radius_px / step))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1] * step
    disk = oy**2 + ox**2 <= radius_px**2
    offsets = np.stack([oy[disk], ox[disk]], axis=1)  # (K, 2)
    out = np.array(points, np.float64)
    if len(out) == 0:
        return out
    for _ in range(rounds):
        coords = out[:, None, :] + offsets[None]  # (N, K, 2)
        values = ndimage.map_coordinates(image, coords.reshape(-1, 2).T, order=1, mode="nearest")
        values = values.reshape(len(out), -1)
        weights = values - values.min(axis=1, keepdims=True)
        total = weights.sum(axis=1)
        ok = total > 0
        shift = (weights[:, :, None] * offsets[None]).sum(axis=1) / np.where(ok, total, 1.0)[:, None]
        out[ok] += shift[ok]
    return out


def find_columns(image: np.ndarray, pixel_ang: float, a_ang: float) -> Tuple[np.ndarray, np.ndarray]:
    """Bright columns of a HAADF image: ``(N, 2)`` (row, col) positions in pixels and
    their (smoothed) intensities. See the module notes, step 9."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(image, np.float64), max(0.5, 0.25 / pixel_ang), mode="reflect")
    min_sep = 0.35 * a_ang / pixel_ang
    points = _local_maxima(smooth, min_sep, float(np.median(smooth)))
    r_ref = max(1.0, 0.25 * a_ang / pixel_ang)
    h, w = image.shape
    inside = (points[:, 0] >= r_ref) & (points[:, 1] >= r_ref) & (points[:, 0] <= h - 1 - r_ref) \
        & (points[:, 1] <= w - 1 - r_ref)
    points = _centroid(smooth, points[inside], r_ref)
    if len(points) == 0:
        return points.reshape(0, 2), np.zeros(0)
    from scipy import ndimage as nd

    intensity = nd.map_coordinates(smooth, points.T, order=1, mode="nearest")
    from scipy.spatial import cKDTree

    tree = cKDTree(points)  # refined peaks closer than min_sep: keep the brighter
    removed = np.zeros(len(points), bool)
    for i in np.argsort(-intensity):
        if not removed[i]:
            for j in tree.query_ball_point(points[i], min_sep):
                removed[j] = removed[j] or j != i
    keep = np.flatnonzero(~removed)
    return points[keep], intensity[keep]


@dataclass
class Lattice:
    """A square lattice in pixel coordinates: site (u, v) at ``origin + u·e1 + v·e2``."""

    origin: np.ndarray  # (row, col) of an A site
    basis: np.ndarray  # (2, 2): rows e1, e2 in (row, col) pixels

    @property
    def a_px(self) -> float:
        return float(np.mean(np.linalg.norm(self.basis, axis=1)))

    def coords(self, points: np.ndarray) -> np.ndarray:
        return (points - self.origin) @ np.linalg.inv(self.basis)


def classify_columns(points: np.ndarray, intensity: np.ndarray, a_px: float,
                     a_brighter: bool = True) -> Tuple[np.ndarray, Optional[Lattice]]:
    """Sublattice of each HAADF column (0 = A, 1 = B, -1 = neither) and the fitted lattice.

    Nearest neighbours (A–B, at a/√2 along the cell diagonals) give the orientation and
    the lattice parameter; parity of the lattice coordinates gives the two sublattices;
    the brighter one is A if ``a_brighter``.
    """
    from scipy.spatial import cKDTree

    labels = -np.ones(len(points), np.int8)
    if len(points) < 4:
        return labels, None
    dist, idx = cKDTree(points).query(points, k=2)
    vectors = points[idx[:, 1]] - points
    d_nn = float(np.median(dist[:, 1]))
    if not 0.5 * a_px <= d_nn <= 0.95 * a_px:  # A–B neighbours expected at 0.707 a
        log.warning("columns: nearest-neighbour distance %.2f px does not fit a perovskite with a = %.2f px; "
                    "sublattices not assigned", d_nn, a_px)
        return labels, None
    angle = np.arctan2(vectors[:, 0], vectors[:, 1])
    phi = np.angle(np.mean(np.exp(4j * angle))) / 4  # a diagonal direction, mod 90°
    a_est = d_nn * math.sqrt(2)
    basis = a_est * np.array([[math.sin(phi - math.pi / 4), math.cos(phi - math.pi / 4)],
                              [math.sin(phi + math.pi / 4), math.cos(phi + math.pi / 4)]])
    centre = np.array([0.5 * points[:, 0].max() + 0.5 * points[:, 0].min(),
                       0.5 * points[:, 1].max() + 0.5 * points[:, 1].min()])
    ref = points[np.argmin(np.linalg.norm(points - centre, axis=1))]
    lattice = Lattice(ref.copy(), basis)
    parity = labels
    for _ in range(3):
        uv = lattice.coords(points)
        same = np.all(np.abs(uv - np.round(uv)) < 0.25, axis=1)
        other = np.all(np.abs(uv - 0.5 - np.round(uv - 0.5)) < 0.25, axis=1)
        parity = np.where(same, 0, np.where(other, 1, -1)).astype(np.int8)
        ok = parity >= 0
        if ok.sum() < 3:
            return -np.ones(len(points), np.int8), None
        ideal = np.where(same[:, None], np.round(uv), np.round(uv - 0.5) + 0.5)[ok]
        design = np.column_stack([np.ones(ok.sum()), ideal])
        solution, *_ = np.linalg.lstsq(design, points[ok], rcond=None)
        lattice = Lattice(solution[0], solution[1:])
    if not np.any(parity == 0) or not np.any(parity == 1):
        return parity, lattice
    brighter = 0 if intensity[parity == 0].mean() >= intensity[parity == 1].mean() else 1
    a_class = brighter if a_brighter else 1 - brighter
    labels = np.where(parity < 0, -1, np.where(parity == a_class, 0, 1)).astype(np.int8)
    if a_class == 1:  # put the lattice origin on an A site
        lattice = Lattice(lattice.origin + 0.5 * lattice.basis.sum(axis=0), lattice.basis)
    on_a = labels == 0
    if on_a.sum() >= 3:  # the reference lattice is the A sublattice's own (B shifts stay out of it)
        uv = np.round(lattice.coords(points[on_a]))
        design = np.column_stack([np.ones(len(uv)), uv])
        solution, *_ = np.linalg.lstsq(design, points[on_a], rcond=None)
        if np.linalg.matrix_rank(design) == 3:
            lattice = Lattice(solution[0], solution[1:])
    return labels, lattice


def o_sites(b_points: np.ndarray, a_px: float) -> np.ndarray:
    """Non-B-site O columns: midpoints of neighbouring B columns (0.75–1.25 a apart)."""
    from scipy.spatial import cKDTree

    if len(b_points) < 2:
        return np.zeros((0, 2))
    pairs = cKDTree(b_points).query_pairs(1.25 * a_px, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2))
    d = np.linalg.norm(b_points[pairs[:, 0]] - b_points[pairs[:, 1]], axis=1)
    pairs = pairs[d >= 0.75 * a_px]
    return 0.5 * (b_points[pairs[:, 0]] + b_points[pairs[:, 1]])


def _a_brighter(info: dict) -> bool:
    """Whether the A column is the brighter HAADF column for the run's materials (Z_A ≥ Z_B)."""
    try:
        from ase.data import atomic_numbers
    except ImportError:  # pragma: no cover - ase is a dependency
        return True
    votes = [atomic_numbers.get(m.get("A"), 0) >= atomic_numbers.get(m.get("B"), 0)
             for m in (info.get("materials") or {}).values()]
    return all(votes) if votes else True


def _lattice_parameter(info: dict) -> float:
    values = [float(m["a"]) for m in (info.get("materials") or {}).values() if m.get("a")]
    return float(np.mean(values)) if values else 3.9


def _tilt_deg(dxy: np.ndarray, a_ang: float) -> float:
    if len(dxy) == 0:
        return float("nan")
    rms = math.sqrt(float(np.mean(np.sum(dxy**2, axis=1))))
    return math.degrees(math.atan(2 * rms / a_ang))


def column_statistics(haadf: np.ndarray, pixel_ang: float, maps: Dict[str, np.ndarray],
                      spread: Dict[str, np.ndarray], members: Sequence[Dict[str, np.ndarray]],
                      info: dict) -> Tuple[Dict[str, np.ndarray], dict]:
    """Per-column table and per-sublattice summary (module notes, step 9)."""
    from scipy import ndimage

    a_prior = _lattice_parameter(info)
    points, intensity = find_columns(haadf, pixel_ang, a_prior)
    labels, lattice = classify_columns(points, intensity, a_prior / pixel_ang, _a_brighter(info))
    a_px = lattice.a_px if lattice is not None else a_prior / pixel_ang
    a_ang = a_px * pixel_ang
    keep = labels >= 0
    cols_points = [points[keep]]
    cols_labels = [labels[keep].astype(np.int8)]
    cols_intensity = [intensity[keep]]
    o_points = o_sites(points[labels == 1], a_px)
    if len(o_points):
        cols_points.append(o_points)
        cols_labels.append(np.full(len(o_points), 2, np.int8))
        cols_intensity.append(ndimage.map_coordinates(haadf, o_points.T, order=1, mode="nearest"))
    pts = np.concatenate(cols_points) if cols_points else np.zeros((0, 2))
    sub = np.concatenate(cols_labels)
    table: Dict[str, np.ndarray] = {
        "x_ang": (pts[:, 1] + 0.5) * pixel_ang,
        "y_ang": (pts[:, 0] + 0.5) * pixel_ang,
        "sublattice": sub,
        "intensity": np.concatenate(cols_intensity).astype(np.float64),
    }

    def sample(image):
        return ndimage.map_coordinates(np.asarray(image, np.float64), pts.T, order=1, mode="nearest") \
            if len(pts) else np.zeros(0)

    if "potential" in maps:
        table["potential"] = sample(maps["potential"][..., 0])
    if lattice is not None:
        uv = lattice.coords(pts)
        half = np.where(sub == 1, 0.5, 0.0)[:, None]
        ideal = lattice.origin + (np.round(uv - half) + half) @ lattice.basis
        if np.any(sub == 2):  # O sites: one half-integer coordinate
            o = sub == 2
            frac = uv[o] - np.floor(uv[o])
            snapped = np.floor(uv[o]) + np.where(np.abs(frac - 0.5) < 0.25, 0.5, np.round(frac))
            ideal[o] = lattice.origin + snapped @ lattice.basis
        table["lattice_dx_ang"] = (pts[:, 1] - ideal[:, 1]) * pixel_ang
        table["lattice_dy_ang"] = (pts[:, 0] - ideal[:, 0]) * pixel_ang
    summary: dict = {"a_ang": a_ang, "lattice_fitted": lattice is not None, "columns": int(len(pts))}
    if "displacement" in maps:
        disp = np.zeros((len(pts), 3))
        std = np.zeros((len(pts), 3))
        per_member = np.zeros((len(members), len(pts), 3))
        for s in range(3):
            on = sub == s
            if not np.any(on):
                continue
            sel = pts[on].T
            for c in range(3):
                ch = 3 * s + c
                disp[on, c] = ndimage.map_coordinates(maps["displacement"][..., ch].astype(np.float64), sel,
                                                      order=1, mode="nearest")
                std[on, c] = ndimage.map_coordinates(spread["displacement"][..., ch].astype(np.float64), sel,
                                                     order=1, mode="nearest")
                for m, member in enumerate(members):
                    per_member[m, on, c] = ndimage.map_coordinates(
                        member["displacement"][..., ch].astype(np.float64), sel, order=1, mode="nearest")
        for c, comp in enumerate(("dx", "dy", "dz")):
            table[f"{comp}_ang"] = disp[:, c]
            table[f"std_{comp}_ang"] = std[:, c]
        for s, name in enumerate(SUBLATTICES):
            on = sub == s
            summary[name] = {
                "count": int(on.sum()),
                "mean_d_ang": [float(v) for v in disp[on].mean(axis=0)] if on.any() else [float("nan")] * 3,
                "mean_abs_d_ang": float(np.linalg.norm(disp[on], axis=1).mean()) if on.any() else float("nan"),
                "std_d_ang": [float(v) for v in disp[on].std(axis=0)] if on.any() else [float("nan")] * 3,
            }
        o = sub == 2
        summary["tilt_deg"] = _tilt_deg(disp[o, :2], a_ang)
        per_column = np.degrees(np.arctan(2 * np.linalg.norm(disp[o, :2], axis=1) / a_ang)) if o.any() else np.zeros(0)
        summary["tilt_spread_deg"] = float(per_column.std()) if o.any() else float("nan")
        member_tilts = [_tilt_deg(per_member[m][o, :2], a_ang) for m in range(len(members))]
        summary["tilt_tta_std_deg"] = float(np.std(member_tilts)) if o.any() else float("nan")
    else:
        for s, name in enumerate(SUBLATTICES):
            summary[name] = {"count": int((sub == s).sum())}
    return table, summary


# ========================================================================== output
HSPY_VERSION = "3.3"


def _attr(value):
    if isinstance(value, (dict, list, tuple)) and not (isinstance(value, (list, tuple)) and value
                                                      and all(isinstance(v, (int, float)) for v in value)):
        return json.dumps(value)
    return value


def _write_dict(group, data: dict) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            _write_dict(group.require_group(key), value)
        elif value is None:
            group.attrs[key] = "_None_"
        else:
            group.attrs[key] = value


def _write_signal(experiments, name: str, data: np.ndarray, axes: List[dict], metadata: dict,
                  original_metadata: dict) -> None:
    group = experiments.create_group(name)
    group.attrs["package"] = ""
    group.attrs["package_version"] = ""
    group.create_dataset("data", data=np.asarray(data), compression="gzip", shuffle=True)
    for i, axis in enumerate(axes):
        _write_dict(group.create_group(f"axis-{i}"), axis)
    _write_dict(group.create_group("metadata"), metadata)
    _write_dict(group.create_group("original_metadata"), original_metadata)
    _write_dict(group.create_group("attributes"), {"_lazy": False})
    group.create_group("learning_results")


def _space_axes(shape: Tuple[int, int], pixel_ang: float) -> List[dict]:
    return [{"name": name, "size": int(n), "scale": float(pixel_ang), "offset": 0.5 * float(pixel_ang),
             "units": "Å", "navigate": False} for name, n in zip("yx", shape)]


def _channel_axis(n: int) -> dict:
    return {"name": "channel", "size": int(n), "scale": 1.0, "offset": 0.0, "units": "_None_", "navigate": True}


@dataclass
class Reconstruction:
    """Everything one input gives (maps in physical units, on the training grid)."""

    name: str
    pixel_size_ang: float  # of the maps
    input: np.ndarray  # (C, H, W) clipped, resampled raw input
    maps: Dict[str, np.ndarray]  # head → (H, W, K), TTA mean
    spread: Dict[str, np.ndarray]  # head → (H, W, K), TTA std
    columns: Dict[str, np.ndarray]
    summary: dict
    provenance: dict = field(default_factory=dict)

    @property
    def fov_ang(self) -> Tuple[float, float]:
        return (self.input.shape[1] * self.pixel_size_ang, self.input.shape[2] * self.pixel_size_ang)


def write_hspy(path: Path, rec: Reconstruction) -> None:
    """The reconstruction as a HyperSpy HDF5 file, atomically (temporary file, then
    ``os.replace``; on failure the temporary file is removed and nothing is left)."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["file_format"] = "HyperSpy"
            f.attrs["file_format_version"] = HSPY_VERSION
            exps = f.create_group("Experiments")
            shape = rec.input.shape[1:]
            p = rec.pixel_size_ang
            short = {"stemnet_version": __version__, "run": rec.provenance.get("run", ""),
                     "inputs": json.dumps(rec.provenance.get("inputs", []))}

            def meta(title, quantity, extra=None):
                md = {"General": {"title": title, "original_filename": rec.name},
                      "Signal": {"signal_type": "", "quantity": quantity}}
                if extra:
                    md["Stemnet"] = extra
                return md

            channels = rec.provenance.get("channels", [])
            _write_signal(exps, "input", rec.input.astype(np.float32), [_channel_axis(len(rec.input))]
                          + _space_axes(shape, p), meta("input", "Intensity (clipped, resampled)",
                                                        {"channels": ", ".join(channels)}), {"stemnet": short})
            for head, value in rec.maps.items():
                if head == "displacement":
                    unit, quantity = "Å", "Displacement (Å)"
                    extra = {"channels": ", ".join(DISPLACEMENT_CHANNELS),
                             "note": "x = column axis, y = row axis, z = beam; "
                                     "the value at a column centre is the column's mean displacement"}
                elif head == "potential":
                    unit, quantity, extra = "V·Å", "Projected potential (V·Å)", None
                else:
                    unit, quantity, extra = "", head, None
                for suffix, array in (("", value), ("_std", rec.spread[head])):
                    data = np.moveaxis(array, -1, 0)
                    if data.shape[0] == 1:
                        data, axes = data[0], _space_axes(shape, p)
                    else:
                        axes = [_channel_axis(data.shape[0])] + _space_axes(shape, p)
                    title = head + suffix
                    q = quantity if not suffix else f"{quantity} TTA std"
                    md = meta(title, q, dict(extra or {}, units=unit))
                    _write_signal(exps, title, data.astype(np.float32), axes, md, {"stemnet": short})
            group = f.create_group("stemnet")
            for key, value in rec.provenance.items():
                group.attrs[key] = _attr(value)
            cols = group.create_group("columns")
            cols.attrs["sublattice_codes"] = "0 = A, 1 = B, 2 = O (non-B-site)"
            cols.attrs["units"] = "positions and displacements in Å; potential in V·Å"
            for key, value in rec.columns.items():
                cols.create_dataset(key, data=np.asarray(value))
            summ = group.create_group("summary")
            for key, value in rec.summary.items():
                summ.attrs[key] = _attr(value)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_reconstruction(path: Path, rec: Reconstruction) -> None:
    """PNG (atomic): the input, the potential, displacement arrows per sublattice over the
    image (quiver with a scale arrow), and the TTA uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    h, w = rec.input.shape[1:]
    p = rec.pixel_size_ang
    extent = (0, w * p, h * p, 0)
    channels = rec.provenance.get("channels", [])
    base = rec.input[channels.index("haadf")] if "haadf" in channels else rec.input[0]
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.5))
    ax = axes[0, 0]
    ax.imshow(base, cmap="gray", extent=extent)
    ax.set_title(f"input ({'haadf' if 'haadf' in channels else channels[0] if channels else ''})")
    ax = axes[0, 1]
    if "potential" in rec.maps:
        im = ax.imshow(rec.maps["potential"][..., 0], cmap="viridis", extent=extent)
        fig.colorbar(im, ax=ax, fraction=0.046, label="V·Å")
        ax.set_title("projected potential")
    else:
        ax.axis("off")
    ax = axes[1, 0]
    ax.imshow(base, cmap="gray", extent=extent)
    ax.set_title("displacement per sublattice (dx, dy)", pad=18)
    cols = rec.columns
    if "dx_ang" in cols and len(cols["dx_ang"]):
        d = np.hypot(cols["dx_ang"], cols["dy_ang"])
        ref = float(10 ** math.floor(math.log10(max(float(np.percentile(d, 90)), 1e-3))))
        ref = ref * (5 if np.percentile(d, 90) >= 5 * ref else 2 if np.percentile(d, 90) >= 2 * ref else 1)
        arrow_len = rec.summary.get("a_ang", 4.0) / 3  # Å on the image for a displacement of ``ref``
        scale = ref / arrow_len
        q = None
        for s, (name, colour) in enumerate(zip(SUBLATTICES, ("tab:red", "tab:cyan", "tab:green"))):
            on = cols["sublattice"] == s
            if np.any(on):
                q = ax.quiver(cols["x_ang"][on], cols["y_ang"][on], cols["dx_ang"][on], cols["dy_ang"][on],
                              color=colour, angles="xy", scale_units="xy", scale=scale, width=0.006,
                              label=name)
        if q is not None:
            ax.quiverkey(q, 0.80, 1.025, ref, f"{ref:g} Å", labelpos="E", coordinates="axes", color="k")
            ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, w * p)
    ax.set_ylim(h * p, 0)
    ax = axes[1, 1]
    if "displacement" in rec.spread:
        unc = np.sqrt(np.mean(rec.spread["displacement"] ** 2, axis=-1))
        label, title = "Å", "uncertainty: TTA std of displacement (rms over channels)"
    else:
        head = next(iter(rec.spread))
        unc, label, title = rec.spread[head][..., 0], "", f"uncertainty: TTA std of {head}"
    im = ax.imshow(unc, cmap="magma", extent=extent)
    fig.colorbar(im, ax=ax, fraction=0.046, label=label)
    ax.set_title(title, fontsize=9)
    for a in axes.ravel():
        a.set_xlabel("x (Å)")
        a.set_ylabel("y (Å)")
    fig.suptitle(rec.name)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


# ========================================================================== driver
def run_info(run) -> Tuple[dict, dict]:
    """``data.json`` and ``normalization.json`` of a run, checked for reconstruction."""
    run = Path(run)
    for name in ("data.json", "normalization.json", "config.yaml", "export/weights.h5"):
        if not (run / name).is_file():
            raise UserError(f"{run}: not a finished run folder ({name} missing; expected an exported model "
                            "from `stemnet train`)")
    info = json.loads((run / "data.json").read_text())
    norm = json.loads((run / "normalization.json").read_text())
    if info.get("input_field") != "stem":
        raise UserError(f"{run}: the model was trained on {info.get('input_field')!r} inputs; reconstruct reads "
                        "STEM detector images, expected a run trained on 'stem' data")
    if not info.get("pixel_size_ang"):
        raise UserError(f"{run}/data.json: no pixel_size_ang; expected the training sampling in Å")
    return info, norm


def prepare(micrograph: Micrograph, info: dict, norm, *, intensity: str = "match") -> Tuple[np.ndarray, np.ndarray]:
    """Checks, clipping, resampling and intensity matching → (raw resampled (C, H, W),
    network input (H, W, C))."""
    p = float(info["pixel_size_ang"])
    where = micrograph.sources[0]["file"] if micrograph.sources else micrograph.name
    check_sampling(micrograph.pixel_size_ang, p, where)
    tile = info["input_shape"][:2]
    shape = resampled_shape(micrograph.data.shape[1:], micrograph.pixel_size_ang, p)
    least = [max(2, int(math.ceil(MIN_TILE_FRACTION * t))) for t in tile]
    if shape[0] < least[0] or shape[1] < least[1]:
        raise UserError(f"{where}: {shape[0]}×{shape[1]} px at the training sampling ({shape[0] * p:.1f}×"
                        f"{shape[1] * p:.1f} Å); at least {least[0]}×{least[1]} px ({least[0] * p:.1f}×"
                        f"{least[1] * p:.1f} Å) needed")
    raw = resample(clip_outliers(micrograph.data), micrograph.pixel_size_ang, p)
    return raw, match_intensity(raw, norm, intensity, where)


def reconstruct(predict: Predictor, micrograph: Micrograph, info: dict, norm, *, intensity: str = "match",
                tile: Optional[Tuple[int, int]] = "auto", tta: bool = True, batch_size: int = 64,
                progress: bool = False, prepared: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Reconstruction:
    """Reconstruct one micrograph with ``predict`` (see :func:`keras_predictor`).

    ``tile``: ``"auto"`` (the run's input size), ``(th, tw)``, or None (one pass over the
    whole image, for models that take any size). ``prepared``: the output of
    :func:`prepare` if already computed.
    """
    raw, x = prepared if prepared is not None else prepare(micrograph, info, norm, intensity=intensity)
    if tile == "auto":
        tile = tuple(info["input_shape"][:2])
    t0 = time.perf_counter()
    members = tta_members(predict, x, tile, tta=tta, batch_size=batch_size, progress=progress)
    members = [norm.denormalize(m) for m in members]
    maps = {k: np.mean([m[k] for m in members], axis=0) for k in members[0]}
    spread = {k: np.std([m[k] for m in members], axis=0) for k in members[0]}
    seconds = time.perf_counter() - t0
    p = float(info["pixel_size_ang"])
    channels = micrograph.channels
    if "haadf" in channels:
        column_image = raw[channels.index("haadf")]
    elif any("adf" in c for c in channels):
        column_image = raw[next(i for i, c in enumerate(channels) if "adf" in c)]
    else:  # bright-field images show columns dark
        column_image = -raw[0]
    columns, summary = column_statistics(column_image, p, maps, spread, members, info)
    summary.update({"fov_ang": [raw.shape[1] * p, raw.shape[2] * p], "shape": list(raw.shape[1:]),
                    "seconds": seconds, "tta_members": len(members)})
    return Reconstruction(micrograph.name, p, raw, maps, spread, columns, summary)


def _provenance(run: Path, micrograph: Micrograph, info: dict, norm_dict: dict, *, intensity: str, tile,
                tta: bool) -> dict:
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    return {
        "stemnet_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(run.resolve()),
        "run_config": config,
        "data_info": info,
        "normalization": norm_dict,
        "inputs": micrograph.sources,
        "channels": micrograph.channels,
        "input_pixel_size_ang": list(micrograph.pixel_size_ang),
        "calibration": micrograph.calibration,
        "pixel_size_ang": float(info["pixel_size_ang"]),
        "filled_nonfinite_pixels": micrograph.filled,
        "clip_percentiles": list(CLIP_PERCENTILES),
        "resampling": "Gaussian anti-alias sigma=(p_out/p_in-1)/2 px when shrinking, then cubic B-spline "
                      "(scipy.ndimage.map_coordinates order 3, reflect) at pixel centres (j+1/2)*p_out",
        "intensity_rule": intensity if intensity == "raw" else
        "match: x' = mu_train + sigma_train * (x - mean(x)) / std(x) per channel, then the run's normalisation",
        "tile": list(tile) if tile else "whole image",
        "tile_overlap": 0.5,
        "window": "sin^2(pi (k + 1/2) / T), separable, normalised by the summed weights",
        "tta": "8 symmetries of the square, mean and std (ddof 0)" if tta else "none",
        "sampling_range": list(SAMPLING_RANGE),
    }


def format_summary(rec: Reconstruction, path: Optional[Path] = None) -> str:
    """The one-line summary of a reconstruction."""
    s = rec.summary
    fy, fx = s["fov_ang"]
    parts = [f"{rec.name}: {fx:.1f}×{fy:.1f} Å at {rec.pixel_size_ang:.3f} Å/px",
             "columns " + ", ".join(f"{n} {s[n]['count']}" for n in SUBLATTICES)]
    if "tilt_deg" in s:
        parts.append("mean |d| " + ", ".join(f"{n} {s[n]['mean_abs_d_ang']:.3f}" for n in SUBLATTICES) + " Å")
        parts.append(f"tilt {s['tilt_deg']:.1f}° ± {s['tilt_spread_deg']:.1f}°")
    line = "; ".join(parts)
    return line + (f" -> {path}" if path is not None else "")


def reconstruct_files(run, inputs: Sequence = (), out=None, *, channels: Optional[Union[str, Mapping]] = None,
                      dataset: Optional[str] = None, pixel_size: Optional[float] = None, fill_nan: bool = False,
                      intensity: str = "match", tta: bool = True, batch_size: int = 64, plot: bool = True,
                      progress: bool = False) -> List[Tuple[Reconstruction, Path]]:
    """Reconstruct each input (or the one ``channels`` field of view) with RUN's model and
    write ``OUT/<name>.hspy`` (+ ``.png``). Every input is read and checked before the
    model is loaded and before anything is written.

    Returns ``[(reconstruction, hspy_path), ...]``.
    """
    from stemnet.data import Normalization

    run = Path(run)
    if out is None:
        raise UserError("--out: expected an output folder")
    if intensity not in INTENSITY_RULES:
        raise UserError(f"--intensity {intensity!r}: expected one of {list(INTENSITY_RULES)}")
    if channels is not None and len(inputs):
        raise UserError("give INPUT files or --channels NAME=FILE,..., not both")
    if channels is None and not len(inputs):
        raise UserError("no input: give INPUT files, or --channels NAME=FILE,... for one file per channel")
    info, norm_dict = run_info(run)
    norm = Normalization.from_dict(norm_dict)
    run_channels = list(info.get("input_channels") or [])
    if len(run_channels) != int(info["input_shape"][2]):
        raise UserError(f"{run}/data.json: input_channels {run_channels} do not match "
                        f"input_shape {info['input_shape']}")
    sources = [channels] if channels is not None else list(inputs)
    prepared = []
    for source in sources:
        micrograph = load_micrograph(source, run_channels, dataset=dataset, pixel_size=pixel_size,
                                     fill_nan=fill_nan)
        prepared.append((micrograph, prepare(micrograph, info, norm, intensity=intensity)))  # all checks first
    names = [m.name for m, _ in prepared]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"inputs {duplicates}: two inputs would write the same {duplicates[0]}.hspy; "
                        "reconstruct them into different --out folders")
    out = Path(out)
    from stemnet.train.run import load_run

    model, _, _, _ = load_run(run)
    predict = keras_predictor(model, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for micrograph, arrays in prepared:
        rec = reconstruct(predict, micrograph, info, norm, intensity=intensity, tta=tta, batch_size=batch_size,
                          progress=progress, prepared=arrays)
        rec.provenance = _provenance(run, micrograph, info, norm_dict, intensity=intensity,
                                     tile=tuple(info["input_shape"][:2]), tta=tta)
        path = out / f"{micrograph.name}.hspy"
        write_hspy(path, rec)
        if plot:
            plot_reconstruction(out / f"{micrograph.name}.png", rec)
        results.append((rec, path))
    return results
