"""Readers for experimental micrographs: detector images with their pixel size.

Formats (by file extension)
---------------------------
=====================  ===============================================================
``.dm3``, ``.dm4``     Gatan DigitalMicrograph (``rsciio.digitalmicrograph``)
``.emd``               Velox (FEI/Thermo Fisher) and Berkeley/NCEM EMD (``rsciio.emd``;
                       Velox files are read with ``select_type="images"``)
``.hspy``, ``.hdf5``   HyperSpy HDF5 (``rsciio.hspy``); a file in any other HDF5 layout
                       needs ``dataset=``
``.h5``, ``.hdf``      plain HDF5: ``dataset="/path/in/file"`` (HyperSpy layout is
                       recognised without it)
``.tif``, ``.tiff``    TIFF (``rsciio.tiff``; ImageJ files whose unit rosettasciio does
                       not pass on (it keeps only "micron") get it from ``tifffile``)
``.mrc``               MRC (``rsciio.mrc``)
``.npy``, ``.npz``     NumPy arrays (no calibration: give the pixel size); ``.npz`` with
                       several arrays needs ``dataset="name"``
=====================  ===============================================================

``dataset=`` with any HDF5-based file (``.h5 .hdf5 .hdf .hspy .emd .nxs``) reads that
dataset with h5py; its pixel size comes from the dataset's attributes
``pixel_size_ang``, or ``pixel_size`` / ``scale`` with ``units`` / ``unit``, if present.

Every reader returns a list of :class:`Image`: one per 2-D image in the file, with a
2-D ``(H, W)`` array (rows along y), its title (a signal title such as ``"HAADF"``, or
``"name[i]"`` for the i-th image of a stack) and its pixel size ``(y, x)`` in Å when the
file states it in a length unit (Å, "A", "angstrom", nm, pm, µm, mm, m). Arrays with
more than 3 dimensions, a 3-D array that is not a stack of images, RGB, complex or
non-numeric data are refused with a one-line :class:`~stemnet.errors.UserError`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from stemnet.errors import UserError, argument

#: Length units → Å per unit (lower-case keys; "a" is Å here, never ampere).
LENGTH_UNITS_ANG = {
    "å": 1.0, "Å": 1.0, "a": 1.0, "ang": 1.0, "angstrom": 1.0, "angstroms": 1.0, "ångström": 1.0,
    "nm": 10.0, "nanometer": 10.0, "nanometre": 10.0, "pm": 0.01, "picometer": 0.01,
    "µm": 1e4, "μm": 1e4, "um": 1e4, "micron": 1e4, "microns": 1e4, "micrometer": 1e4,
    "mm": 1e7, "m": 1e10,
}
FORMATS = {
    ".dm3": "dm", ".dm4": "dm", ".emd": "emd", ".hspy": "hspy", ".hdf5": "hspy", ".h5": "hdf5",
    ".hdf": "hdf5", ".nxs": "hdf5", ".tif": "tiff", ".tiff": "tiff", ".mrc": "mrc", ".npy": "npy",
    ".npz": "npz",
}
HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".hspy", ".emd", ".nxs")


@dataclass
class Image:
    """One 2-D detector image as read from a file."""

    data: np.ndarray  # (H, W), rows along y
    pixel_size_ang: Optional[Tuple[float, float]]  # (y, x) Å, None if the file has no length calibration
    title: str
    source: str
    stacked: bool = False  # one plane of a 3-D array (channel order = plane order)


def sha256(path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unit_to_ang(unit) -> Optional[float]:
    """Å per ``unit`` for a length unit, None for a missing/undefined unit.

    Raises UserError for a unit that is not a real-space length (e.g. ``1/nm``).
    """
    if unit is None:
        return None
    text = str(unit).strip()
    if "\\u" in text:  # ImageJ writes non-ASCII units escaped, e.g. "\\u00C5"
        try:
            text = text.encode("ascii").decode("unicode_escape")
        except UnicodeError:
            pass
    if text.lower() in ("", "<undefined>", "undefined", "none", "px", "pixel", "pixels", "unknown"):
        return None
    key = text.replace(" ", "")
    for candidate in (key, key.lower()):
        if candidate in LENGTH_UNITS_ANG:
            return LENGTH_UNITS_ANG[candidate]
    raise UserError(f"axis unit {text!r} is not a real-space length; expected Å, nm, pm or µm")


def _scale_ang(axis: dict, where: str) -> Optional[float]:
    try:
        factor = unit_to_ang(axis.get("units"))
    except UserError as err:
        raise UserError(f"{where}: {err.marked}") from None
    scale = axis.get("scale")
    if factor is None or scale is None:
        return None
    value = abs(float(scale)) * factor
    return value if math.isfinite(value) and value > 0 else None


def _check_array(data, where: str) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype.names is not None or data.dtype.kind not in "biuf":
        kind = "RGB" if data.dtype.names is not None else str(data.dtype)
        raise UserError(f"{where}: {kind} data; expected a real-valued (grey-scale) detector image")
    return data


def _images_from_array(data, pixel, title: str, source: str, where: str) -> List[Image]:
    """2-D → one image; 3-D ``(N, H, W)`` → N stacked images; otherwise an error."""
    data = _check_array(data, where)
    if data.ndim == 2:
        return [Image(data, pixel, title, source)]
    if data.ndim == 3 and min(data.shape[1:]) > 1:
        return [Image(data[i], pixel, f"{title}[{i}]", source, stacked=True) for i in range(data.shape[0])]
    raise UserError(f"{where}: a {data.ndim}-D array of shape {tuple(data.shape)}; expected a 2-D image "
                    "(H, W) or a stack of images (C, H, W), one per detector channel")


def _from_signal_dicts(dicts: Sequence[dict], path: Path) -> List[Image]:
    """Images of rosettasciio signal dictionaries (``data``, ``axes``, ``metadata``)."""
    images: List[Image] = []
    for k, d in enumerate(dicts):
        data = d.get("data")
        if data is None:
            continue
        title = str(((d.get("metadata") or {}).get("General") or {}).get("title") or f"signal{k}")
        where = f"{path} ({title})"
        axes = list(d.get("axes") or [])
        data = np.asarray(data)
        signal_axes = len([a for a in axes if not a.get("navigate", False)]) if len(axes) == data.ndim else 2
        if signal_axes != 2 or data.ndim < 2:
            if len(dicts) > 1:
                continue  # a spectrum or profile next to images (e.g. in a Velox file): not an image
            raise UserError(f"{where}: a signal with {signal_axes} signal dimension(s), shape {tuple(data.shape)}; "
                            "expected a 2-D image (H, W) or a stack of images (C, H, W)")
        pixel = None
        if len(axes) == data.ndim:
            sy, sx = _scale_ang(axes[-2], where), _scale_ang(axes[-1], where)
            pixel = (sy, sx) if sy and sx else None
        images += _images_from_array(data, pixel, title, str(path), where)
    if not images:
        raise UserError(f"{path}: no 2-D image in the file; expected a detector image")
    return images


def _imagej_unit(path: Path) -> Optional[float]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        meta = tif.imagej_metadata or {}
    return unit_to_ang(meta.get("unit")) if "unit" in meta else None


def _read_tiff(path: Path) -> List[Image]:
    from rsciio.tiff import file_reader

    dicts = file_reader(str(path))
    for d in dicts:  # rosettasciio drops ImageJ units other than "micron"
        axes = d.get("axes") or []
        if len(axes) >= 2 and all(a.get("units") in (None, "", "<undefined>") for a in axes[-2:]):
            if any(float(a.get("scale") or 1.0) != 1.0 for a in axes[-2:]):
                factor = _imagej_unit(path)
                if factor is not None:
                    for a in axes[-2:]:
                        a["units"] = "Å"
                        a["scale"] = float(a["scale"]) * factor
    return _from_signal_dicts(dicts, path)


def _is_hspy(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return "Experiments" in f or f.attrs.get("file_format") in ("HyperSpy", b"HyperSpy")


def _hdf5_candidates(path: Path) -> List[str]:
    import h5py

    found = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.append(f"/{name} {obj.shape}")
                     if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3) else None)
    return found


def _read_hdf5_dataset(path: Path, dataset: str) -> List[Image]:
    import h5py

    with h5py.File(path, "r") as f:
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            listing = ", ".join(_hdf5_candidates(path)[:8]) or "none with 2 or 3 dimensions"
            raise UserError(f"{path}: no dataset {dataset!r}; datasets: {listing}")
        node = f[dataset]
        data = node[()]
        attrs = dict(node.attrs)
    pixel = None
    where = f"{path}:{dataset}"
    if "pixel_size_ang" in attrs:
        value = np.atleast_1d(np.asarray(attrs["pixel_size_ang"], float))
        pixel = (float(value[0]), float(value[-1]))
    else:
        scale = attrs.get("pixel_size", attrs.get("scale"))
        unit = attrs.get("units", attrs.get("unit"))
        if isinstance(unit, bytes):
            unit = unit.decode()
        if scale is not None and unit is not None:
            value = np.atleast_1d(np.asarray(scale, float))
            factor = unit_to_ang(unit)
            if factor is not None:
                pixel = (float(value[0]) * factor, float(value[-1]) * factor)
    name = dataset.strip("/").split("/")[-1] or "data"
    return _images_from_array(data, pixel, name, str(path), where)


def read_images(path, dataset: Optional[str] = None) -> List[Image]:
    """All 2-D images of a file (see the module notes for formats and calibration).

    Raises
    ------
    UserError
        Missing file, unknown extension, a file its reader cannot read, wrong
        dimensionality or data type; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    kind = FORMATS.get(suffix)
    if kind is None:
        raise UserError(f"{path}: unknown image format {suffix or '(no extension)'!r}; expected one of "
                        + " ".join(sorted(FORMATS)))
    try:
        if dataset is not None:
            if suffix in HDF5_SUFFIXES:
                return _read_hdf5_dataset(path, dataset)
            if kind != "npz":
                raise UserError(f"{argument('dataset')} {dataset!r}: only for HDF5-based files and .npz archives, not {suffix}")
        if kind == "dm":
            from rsciio.digitalmicrograph import file_reader

            return _from_signal_dicts(file_reader(str(path)), path)
        if kind == "emd":
            from rsciio.emd import file_reader

            return _from_signal_dicts(file_reader(str(path), select_type="images"), path)
        if kind in ("hspy", "hdf5"):
            if not _is_hspy(path):
                listing = ", ".join(_hdf5_candidates(path)[:8]) or "none with 2 or 3 dimensions"
                raise UserError(f"{path}: not a HyperSpy file; give the image's HDF5 path with {argument('dataset')} "
                                f"(datasets: {listing})")
            from rsciio.hspy import file_reader

            return _from_signal_dicts(file_reader(str(path)), path)
        if kind == "tiff":
            return _read_tiff(path)
        if kind == "mrc":
            from rsciio.mrc import file_reader

            return _from_signal_dicts(file_reader(str(path)), path)
        if kind == "npy":
            data = np.load(path, allow_pickle=False)
            return _images_from_array(data, None, path.stem, str(path), str(path))
        with np.load(path, allow_pickle=False) as archive:  # npz
            keys = list(archive.keys())
            if dataset is None and len(keys) != 1:
                raise UserError(f"{path}: {len(keys)} arrays ({', '.join(keys[:8])}); name one with {argument('dataset')}")
            key = dataset if dataset is not None else keys[0]
            if key not in keys:
                raise UserError(f"{path}: no array {key!r}; arrays: {', '.join(keys[:8])}")
            return _images_from_array(archive[key], None, key, str(path), f"{path}:{key}")
    except UserError:
        raise
    except Exception as err:  # a reader's own error: bad or truncated file
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: cannot read as {kind.upper()} ({type(err).__name__}: {text})") from None


# ------------------------------------------------------------------------ channels
def _tokens(title: str) -> List[str]:
    return [t for t in re.split(r"[^0-9a-z]+", title.lower()) if t]


def match_title(images: Sequence[Image], channel: str) -> List[Image]:
    """Images whose title is ``channel`` (case-insensitive), else whose title holds it
    as a word (``"HAADF Detector"``, ``"DF-HAADF"`` for ``haadf``)."""
    name = channel.lower()
    exact = [im for im in images if im.title.strip().lower() == name]
    return exact or [im for im in images if name in _tokens(im.title)]


def _titles(images: Sequence[Image]) -> str:
    return ", ".join(repr(im.title) for im in images[:8])


def pick_channels(images: Sequence[Image], channels: Sequence[str], where: str) -> List[Image]:
    """One image per run channel, in the run's order, from the images of one file.

    A single image serves a single-channel run; a stack of exactly C planes (``.npy``,
    ``.npz``, an HDF5 dataset, a TIFF or HyperSpy stack) is taken in the run's channel
    order; otherwise every channel must match exactly one signal title.
    """
    n = len(channels)
    if len(images) == 1 and n == 1:
        return list(images)
    if len(images) > 1 and all(im.stacked for im in images):
        if len(images) == n:
            return list(images)
        raise UserError(f"{where}: a 3-D stack of {len(images)} images; the run expects "
                        + (f"a 2-D image for its one channel {list(channels)}" if n == 1 else
                           f"{n} planes (C, H, W) in the order {list(channels)}"))
    picked = []
    for channel in channels:
        found = match_title(images, channel)
        if len(found) != 1:
            problem = "no image" if not found else f"{len(found)} images"
            raise UserError(
                f"{where}: {problem} titled {channel!r} among {len(images)} ({_titles(images)}); the run "
                f"expects channels {list(channels)}: give one file per channel with {argument('channels')} "
                + ",".join(f"{c}=FILE" for c in channels))
        picked.append(found[0])
    return picked


def parse_channel_map(text: str) -> Dict[str, Path]:
    """``"haadf=a.dm4,abf=b.dm4"`` → ``{"haadf": Path("a.dm4"), "abf": Path("b.dm4")}``."""
    mapping: Dict[str, Path] = {}
    for item in [t for t in (text or "").split(",") if t.strip()]:
        name, sep, file = item.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise UserError(f"{argument('channels')} {text!r}: expected NAME=FILE[,NAME=FILE...], e.g. haadf=a.dm4,abf=b.dm4")
        key = name.strip().lower()
        if key in mapping:
            raise UserError(f"{argument('channels')}: channel {key!r} given twice")
        mapping[key] = Path(file.strip())
    if not mapping:
        raise UserError(f"{argument('channels')}: empty; expected NAME=FILE[,NAME=FILE...]")
    return mapping
