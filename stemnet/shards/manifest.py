"""The dataset manifest: ``manifest.json``, built from the shard headers by
:func:`finalize_manifest` (atomically) and read by :func:`read_manifest`.

It holds the fields and parameter names every shard shares, the provenance (generator,
version, config digest, seed), each split's shards with their counts, per-field
statistics (merged over ``train``) and ``extra`` (the simulation config, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, ValidationError

from stemnet.atomic import write_json_atomic
from stemnet.shards.header import IDENTITY_KEYS, SCHEMA_VERSION
from stemnet.shards.paths import SPLITS, manifest_path, shard_files
from stemnet.shards.reader import ShardReader
from stemnet.shards.records import FORMAT_VERSION, PARAMS_DTYPE, ShardError
from stemnet.shards.stats import stats_from_header


def _merge_stats(a: Optional[dict], b: dict) -> dict:
    return dict(b) if a is None else {name: s.merge(b[name]) for name, s in a.items()}


def finalize_manifest(dataset_dir, extra: Optional[dict] = None) -> dict:
    """Build ``manifest.json`` from the shard headers and write it atomically.

    Parameters
    ----------
    dataset_dir : path-like
        The dataset folder holding ``train/``, ``val/``, ``test/`` shards. No writer
        may have a shard open in this process (py-lmdb opens an environment once).
    extra : dict, optional
        JSON-serialisable data stored under ``"extra"`` (e.g. the simulation config).

    Returns
    -------
    dict
        The manifest. ``stats`` holds per-field statistics merged over the ``train``
        split (over all splits if train is empty; see ``stats_from``); each split
        entry also has its own ``stats``.

    Raises
    ------
    ShardError
        No shards, or shards that disagree on fields, parameters or provenance.
    """
    dataset_dir = Path(dataset_dir)
    first, splits = None, {}
    for split in SPLITS:
        shards, stats = [], None
        for path in shard_files(dataset_dir, split):
            with ShardReader(path, verify=False) as reader:
                header = reader.header
            first = first or (path, header)
            _check_same_dataset(first, path, header)
            shards.append({"path": f"{split}/{path.name}", "count": header["count"]})
            stats = _merge_stats(stats, stats_from_header(header))
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards, "stats": stats}
    if first is None:
        raise ShardError(
            f"{dataset_dir}: no shards; expected {{train,val,test}}/shard-NNNNN.lmdb files"
        )
    manifest = _manifest_from(first[1], splits, extra)
    write_json_atomic(manifest_path(dataset_dir), manifest)
    return manifest


def _check_same_dataset(first: Tuple[Path, dict], path: Path, header: dict) -> None:
    ref_path, ref = first
    for key in IDENTITY_KEYS:
        mine, theirs = header["meta"].get(key), ref["meta"].get(key)
        if mine != theirs:
            raise ShardError(
                f"{path}: meta {key}={mine!r} but {ref_path} has {theirs!r}; "
                "the shards of one dataset must agree"
            )
    for key in ("fields", "param_names"):
        if header[key] != ref[key]:
            raise ShardError(
                f"{path}: {key} {header[key]} differ from {ref_path} ({ref[key]}); "
                "the shards of one dataset must agree"
            )


def _manifest_from(header: dict, splits: dict, extra: Optional[dict]) -> dict:
    used = ["train"] if splits["train"]["count"] else [s for s in SPLITS if splits[s]["count"]]
    merged = None
    for split in used:
        merged = _merge_stats(merged, splits[split]["stats"])
    for entry in splits.values():
        entry["stats"] = {n: s.to_dict() for n, s in (entry["stats"] or {}).items()}
    return {
        "schema_version": SCHEMA_VERSION,
        "format_version": FORMAT_VERSION,
        "fields": header["fields"],
        "param_names": header["param_names"],
        "params_dtype": PARAMS_DTYPE,
        **{key: header["meta"].get(key) for key in IDENTITY_KEYS},
        "splits": splits,
        "total": sum(splits[s]["count"] for s in SPLITS),
        "stats": {n: s.to_dict() for n, s in (merged or {}).items()},
        "stats_from": used,
        "extra": extra or {},
    }


def read_manifest(dataset_dir) -> dict:
    """The dataset's manifest.

    Raises
    ------
    ShardError
        Missing or unreadable ``manifest.json``, or a different schema version.
    """
    path = manifest_path(dataset_dir)
    if not path.is_file():
        raise ShardError(
            f"{path}: no manifest; expected one written by `stemnet simulate --finalize`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: schema version {found!r}; expected {SCHEMA_VERSION}")
    return manifest


# ------------------------------------------------------------------------------ extra.simulation
class _Section(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CbedSection(_Section):
    grid: Optional[Tuple[int, int]] = None  # (gx, gy) probe positions
    k: Optional[int] = None  # pixels per pattern side
    max_angle_mrad: Optional[float] = None


class StemSection(_Section):
    detectors: Dict[str, Any] = {}  # detector name -> its settings, in channel order


class MicroscopeSection(_Section):
    energy_ev: Optional[float] = None
    convergence_mrad: Optional[float] = None


class SpecimenSection(_Section):
    materials: List[str] = []
    zone: Optional[str] = None  # zone axis, e.g. "001"


class DistortionSection(_Section):
    glazer: Any = None


class SimulationSection(_Section):
    """What ``stemnet`` reads of ``manifest["extra"]["simulation"]`` (the simulation config
    the dataset was made with; its full schema belongs to ``simulation``). Every entry is
    optional: datasets written by other tools may have none."""

    present: bool = False  # whether the manifest has a simulation section at all
    mode: Optional[str] = None  # "cbed" or "stem"
    seed: Optional[int] = None
    num_samples: Optional[int] = None
    output_shape: Optional[Any] = None
    fov_ang: Optional[float] = None  # field of view (Å)
    sampling_ang: Optional[float] = None  # simulation pixel size (Å)
    noise_dose_e_per_ang2: Optional[Any] = None
    cbed: CbedSection = CbedSection()
    stem: StemSection = StemSection()
    microscope: MicroscopeSection = MicroscopeSection()
    specimen: SpecimenSection = SpecimenSection()
    distortion: DistortionSection = DistortionSection()
    materials: Dict[str, Any] = {}  # material name -> its description

    @property
    def detectors(self) -> List[str]:
        """STEM detector names in channel order (empty for CBED or when unknown)."""
        return list(self.stem.detectors)


def simulation_section(manifest: dict, where: str = "manifest") -> SimulationSection:
    """The typed simulation section of a manifest (an empty one when there is none).

    Raises
    ------
    ShardError
        The section exists but an entry stemnet reads has the wrong type.
    """
    raw = (manifest.get("extra") or {}).get("simulation")
    if not raw:
        return SimulationSection()
    if not isinstance(raw, dict):
        raise ShardError(f"{where}: extra.simulation is {type(raw).__name__}; expected a mapping")
    for key in ("cbed", "stem", "microscope", "specimen", "distortion", "materials"):
        if raw.get(key) is None:
            raw = {k: v for k, v in raw.items() if k != key}
    try:
        return SimulationSection(present=True, **{k: v for k, v in raw.items() if k != "present"})
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ShardError(f"{where}: extra.simulation.{loc}: {first['msg']}") from None
