"""Module for writing a reconstruction: HyperSpy signals and the column table (HDF5, CSV).

``<name>.hspy`` (temporary file, then ``os.replace``): HyperSpy signals under
``/Experiments`` with axes in Å (pixel ``i`` at ``offset + i·scale``, offset = scale/2):
``input`` (C, H, W), each map head and its ``_std`` (``potential`` V·Å, ``displacement``
9 channels Å, ``tilt`` 3 channels degrees); ``/stemnet/columns`` (one dataset per table
column), ``/stemnet/summary`` and the provenance in the attributes of ``/stemnet``.
``<name>_columns.csv`` holds the same column table.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from stemnet import __version__
from stemnet.data.layout import DISPLACEMENT_CHANNELS, SUBLATTICES  # noqa: F401 (re-exported)
TILT_CHANNELS = ("tilt_x", "tilt_y", "tilt_z")
HSPY_VERSION = "3.3"


def _attr(value):
    """``value`` as an HDF5 attribute: None as HyperSpy's "_None_", dicts and sequences
    other than plain numbers as JSON, the rest as it is."""
    if value is None:
        return "_None_"
    if isinstance(value, (dict, list, tuple)) and not (isinstance(value, (list, tuple)) and value
                                                      and all(isinstance(v, (int, float)) for v in value)):
        return json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    return value


def _plain_array(value) -> bool:
    """True when ``value`` converts to a numeric or string array (an HDF5 attribute type)."""
    try:
        return np.asarray(value).dtype != object
    except ValueError:  # ragged
        return False


def _write_dict(group, data: dict) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            _write_dict(group.require_group(key), value)
        elif value is None:
            group.attrs[key] = "_None_"
        elif isinstance(value, (list, tuple, np.ndarray)) and not _plain_array(value):
            # ragged, mixed or None-holding sequences have no HDF5 attribute type: JSON
            group.attrs[key] = json.dumps(np.asarray(value, dtype=object).tolist(), default=str)
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
                elif head == "tilt":
                    unit, quantity = "°", "Octahedral tilt (degrees)"
                    extra = {"channels": ", ".join(TILT_CHANNELS),
                             "note": "per-cell tilt angles about x, y, z; counter-clockwise about +axis"}
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




def write_columns_csv(path: Path, columns: Dict[str, np.ndarray]) -> None:
    """The column table as CSV (one row per column, units in the column names), atomically."""
    path = Path(path)
    keys = list(columns)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            for row in zip(*(np.asarray(columns[k]) for k in keys)):
                writer.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else int(v) for v in row])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
