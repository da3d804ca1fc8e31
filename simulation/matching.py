"""Experiment-matched simulation configs (``stemnet config match MICROGRAPH --material NAME``).

The pixel size comes from the micrograph's calibrated axes (read by
:func:`stemnet.reconstruct.read_images`); the beam energy, convergence semi-angle and
detector collection angles from its metadata where rosettasciio finds them (the
``Acquisition_instrument.TEM`` tree HyperSpy builds from DM3/DM4, Velox EMD and HyperSpy
files; Velox's ``Detectors.*.CollectionAngleRange``); an option overrides the file. What
is still missing is asked for in one line naming the options. The rest comes from a base
config (``configs/simulation/demo.yaml``): the image size is chosen for the model (at
least two unit cells, a multiple of 8 pixels), not for the micrograph, which the
reconstruction tiles.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import yaml

from stemnet.errors import UserError, argument

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs/simulation/demo.yaml"
CATALOGUE = REPO / "configs/simulation/paper.yaml"  # its materials table names the known perovskites
_READERS = {"dm": ("rsciio.digitalmicrograph", {}), "emd": ("rsciio.emd", {"select_type": "images"}),
            "hspy": ("rsciio.hspy", {}), "tiff": ("rsciio.tiff", {}), "mrc": ("rsciio.mrc", {})}
_DETECTORS = ("haadf", "abf", "bf")


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for part in head:
        tree = tree.setdefault(part, {})
    tree[last] = value


def file_metadata(path: Path) -> dict:
    """The ``metadata`` tree of the file's first signal with rosettasciio's mapping of the
    original metadata applied (as HyperSpy does when it loads the file), plus the
    ``original_metadata`` under ``"original"``; ``{}`` for formats without metadata."""
    import importlib

    from stemnet.reconstruct.readers import FORMATS

    kind = FORMATS.get(Path(path).suffix.lower())
    if kind not in _READERS:
        return {}
    module, kwargs = _READERS[kind]
    try:
        signal = importlib.import_module(module).file_reader(str(path), **kwargs)[0]
    except Exception as err:  # the image reader has accepted the file; metadata are optional
        return {"error": f"{type(err).__name__}: {err}"}
    metadata = dict(signal.get("metadata") or {})
    original = signal.get("original_metadata") or {}
    for source, (target, convert) in (signal.get("mapping") or {}).items():
        value = _lookup(original, source)
        if value is not None:
            try:
                _set(metadata, target, convert(value) if convert else value)
            except Exception:
                continue
    metadata["original"] = original
    return metadata


def _velox_detectors(original: dict) -> Dict[str, Tuple[float, float]]:
    """Inserted Velox scanning detectors with a ``CollectionAngleRange`` (rad) → mrad."""
    out = {}
    for detector in (original.get("Detectors") or {}).values():
        name = str(detector.get("DetectorName", "")).lower()
        span = detector.get("CollectionAngleRange")
        if name in _DETECTORS and isinstance(span, dict) and str(detector.get("Inserted", "true")) == "true":
            out[name] = (1e3 * float(span["begin"]), 1e3 * float(span["end"]))
    return out


def _materials() -> dict:
    table = {}
    for path in (CATALOGUE, BASE_CONFIG):
        table.update(yaml.safe_load(path.read_text())["simulation"]["materials"])
    return table


def _pair(text: Optional[str], option: str) -> Optional[Tuple[float, float]]:
    if text is None:
        return None
    try:
        inner, outer = (float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"{option} {text}: expected INNER,OUTER collection semi-angles in mrad, e.g. 60,200") from None
    if not 0 <= inner < outer:
        raise UserError(f"{option} {text}: expected 0 <= INNER < OUTER (mrad)")
    return inner, outer


def match(micrograph: Path, *, material: str, zone: str = "001", pixel_size_ang: Optional[float] = None,
          energy_kev: Optional[float] = None, convergence_mrad: Optional[float] = None,
          detectors_mrad: Optional[Dict[str, Optional[str]]] = None, base: Path = BASE_CONFIG) -> Tuple[dict, dict]:
    """A simulation config matched to ``micrograph``; returns ``(config dict, sources)``,
    ``sources`` naming where each matched value came from."""
    from simulation.config import SimulationConfig
    from stemnet.config import ConfigError
    from stemnet.reconstruct import read_images
    from simulation.imaging import nyquist_step_ang

    micrograph = Path(micrograph)
    catalogue = _materials()
    if material not in catalogue:
        raise UserError(f"{argument('material')} {material}: unknown; expected one of {', '.join(sorted(catalogue))}")
    images = read_images(micrograph)
    metadata = file_metadata(micrograph)
    tem = _lookup(metadata, "Acquisition_instrument.TEM") or {}
    sources: Dict[str, str] = {}

    if pixel_size_ang is not None:
        pixel, sources["pixel_size_ang"] = float(pixel_size_ang), "option --pixel-size"
    elif images[0].pixel_size_ang is not None:
        pixel = float(min(images[0].pixel_size_ang))
        sources["pixel_size_ang"] = "file calibration (axes scale and units)"
    else:
        raise UserError(f"{micrograph}: the image has no length calibration; give {argument('pixel_size_ang')} (Å per pixel)")

    def value(name, option, given, meta_key, scale=1.0):
        if given is not None:
            sources[name] = f"option {option}"
            return float(given)
        if tem.get(meta_key) is not None:
            sources[name] = f"file metadata (Acquisition_instrument.TEM.{meta_key})"
            return float(tem[meta_key]) * scale
        return None

    energy_ev = value("energy_ev", "--energy-kev", None if energy_kev is None else energy_kev * 1e3,
                      "beam_energy", 1e3)
    convergence = value("convergence_mrad", "--convergence-mrad", convergence_mrad, "convergence_angle")
    detectors = {}
    in_file = _velox_detectors(metadata.get("original") or {})
    for name in _DETECTORS:
        given = _pair((detectors_mrad or {}).get(name), argument(f"{name}_mrad"))
        if given is not None:
            detectors[name], sources[f"detectors.{name}"] = given, f"option --{name}-mrad"
        elif name in in_file:
            detectors[name] = in_file[name]
            sources[f"detectors.{name}"] = "file metadata (Detectors.CollectionAngleRange)"
    missing = [opt for opt, v in ((f"{argument('energy_kev')} KEV", energy_ev), (f"{argument('convergence_mrad')} MRAD", convergence)) if v is None]
    if not detectors:
        missing.append(f"{argument('haadf_mrad')} INNER,OUTER (and/or {argument('abf_mrad')}, {argument('bf_mrad')})")
    if missing:
        raise UserError(f"{micrograph}: not in the file's metadata: give {', '.join(missing)}")

    a = float(catalogue[material]["a"])
    if pixel > a / 4:
        raise UserError(f"{micrograph}: {pixel:.4g} Å pixels cannot resolve the atomic columns of {material} "
                        f"(a = {a:g} Å); expected at most a/4 = {a / 4:.3g} Å (or give {argument('pixel_size_ang')})")
    data = yaml.safe_load(Path(base).read_text())["simulation"]
    pixels = 8 * math.ceil(2 * a / pixel / 8)  # at least two cells, a multiple of 8 for the model
    fov = pixels * pixel
    nyquist = nyquist_step_ang(energy_ev, convergence)
    outer = max(o for _, o in detectors.values())
    wavelength = nyquist * 4 * convergence * 1e-3
    data.update(
        materials={material: catalogue[material]}, output_shape=[pixels, pixels], fov_ang=round(fov, 6),
        scan_step_ang=None, undersampled_ok=pixel > nyquist * (1 + 1e-6),
        sampling_ang=round(min(data.get("sampling_ang", 0.05), 0.98 * wavelength / (3 * outer * 1e-3)), 5),
    )
    data["specimen"] = dict(data.get("specimen", {}), materials=[material], zone=str(zone))
    data["microscope"] = dict(data.get("microscope", {}), energy_ev=energy_ev, convergence_mrad=convergence)
    data["stem"] = dict(data.get("stem", {}), detectors={k: list(v) for k, v in detectors.items()})
    data["mode"] = "stem"
    sources.update({"output_shape": f"chosen for the model: >= 2 cells of {a:g} Å, a multiple of 8 pixels "
                                    "(the images of the periodic supercell wrap around)",
                    "fov_ang": "output_shape x pixel size", "sampling_ang": f"band limit of the {outer:g} mrad detector",
                    "other keys": f"default ({Path(base).name})"})
    if data["undersampled_ok"]:
        sources["undersampled_ok"] = (f"the micrograph's {pixel:.3g} Å pixels are coarser than the probe's "
                                      f"Nyquist step {nyquist:.3g} Å: its images are aliased, and so are these")
    try:
        SimulationConfig.model_validate(data)
    except Exception as err:  # a bad combination of options, named by the schema
        raise ConfigError(f"matched config: {str(err).splitlines()[0]}") from None
    return {"simulation": data}, sources


def to_text(config: dict, sources: dict, micrograph: Path) -> str:
    """The config as YAML, headed by comments stating the source of each matched value."""
    lines = [f"# simulation config matched to {micrograph} (stemnet config match)"]
    lines += [f"#   {key}: {source}" for key, source in sources.items()]
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
