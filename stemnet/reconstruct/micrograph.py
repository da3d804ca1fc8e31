"""Module for reading the detector images of one field of view with their calibration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from stemnet.errors import UserError, argument
from stemnet.reconstruct.readers import Image, parse_channel_map, pick_channels, read_images, sha256

CALIBRATION_TOLERANCE = 0.01  # relative pixel-size disagreement allowed between channels


@dataclass
class Micrograph:
    """Raw detector images of one field of view, one per run channel."""

    data: np.ndarray  # (C, H, W) float64, the run's channel order
    pixel_size_ang: Tuple[float, float]  # (y, x) [Å]
    channels: List[str]
    sources: List[dict]  # per channel: channel, file, title, sha256, dtype
    name: str
    calibration: str  # "file" or "--pixel-size"
    filled: int = 0  # non-finite pixels replaced (fill_nan)


def load_micrograph(inputs: Union[str, Path, Mapping[str, Union[str, Path]]], channels: Sequence[str], *,
                    dataset: Optional[str] = None, pixel_size: Optional[float] = None,
                    fill_nan: bool = False, name: Optional[str] = None) -> Micrograph:
    """Read the images of one field of view for a run with input ``channels``.

    ``inputs``: one file holding every channel, or ``{channel: file}`` (a string
    ``"haadf=a.dm4,abf=b.dm4"`` is parsed). Checks shapes, calibration and finiteness;
    integer data (8/16/32-bit counts) is converted to float64.
    """
    channels = [c.lower() for c in channels]
    if isinstance(inputs, str) and "=" in inputs and not Path(inputs).is_file():
        inputs = parse_channel_map(inputs)
    if isinstance(inputs, Mapping):
        mapping = {str(k).lower(): Path(v) for k, v in inputs.items()}
        if set(mapping) != set(channels):
            missing = [c for c in channels if c not in mapping]
            extra = [c for c in mapping if c not in channels]
            raise UserError(f"{argument('channels')} {','.join(mapping)}: the run expects channels {channels}"
                            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        picked: List[Image] = []
        for channel in channels:
            images = read_images(mapping[channel], dataset)
            if len(images) > 1 and all(im.stacked for im in images):
                raise UserError(f"{mapping[channel]}: a 3-D stack of {len(images)} images for channel {channel!r}; "
                                f"expected one 2-D image (H, W) per {argument('channels')} entry (the run expects {channels})")
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
            raise UserError(f"{argument('pixel_size')} {pixel_size}: expected a positive length in Å")
        pixel, calibration = (float(pixel_size), float(pixel_size)), "--pixel-size"
    else:
        for c, im, f in zip(channels, picked, files):
            if im.pixel_size_ang is None:
                raise UserError(f"{f}: no pixel-size calibration for channel {c!r} ({im.title!r}); "
                                f"give {argument('pixel_size')} (Å per pixel)")
        pixel = picked[0].pixel_size_ang
        for c, im in zip(channels, picked):
            if not np.allclose(im.pixel_size_ang, pixel, rtol=CALIBRATION_TOLERANCE, atol=0):
                raise UserError(f"{files[0]}: channels disagree on the pixel size ({channels[0]} {pixel} Å, "
                                f"{c} {im.pixel_size_ang} Å); give {argument('pixel_size')} to override")
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
                                f"pass {argument('fill_nan')} to replace them by the channel's median")
            data[c][bad] = np.median(data[c][~bad])
            filled += int(bad.sum())
        if np.ptp(data[c]) <= 0:
            raise UserError(f"{f}: channel {channels[c]!r} is constant ({data[c].flat[0]:.4g}); "
                            "expected an image with contrast")
    digests = {Path(f).resolve(): sha256(f) for f in set(files)}
    sources = [{"channel": c, "file": str(Path(f).resolve()), "title": im.title, "dtype": str(im.data.dtype),
                "sha256": digests[Path(f).resolve()]} for c, im, f in zip(channels, picked, files)]
    return Micrograph(data, (float(pixel[0]), float(pixel[1])), list(channels), sources,
                      name or Path(files[0]).stem, calibration, filled)
