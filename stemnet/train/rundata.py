"""``RUN/data.json``: what a trained model expects of its data (a typed contract).

Written once by training (:meth:`RunData.from_manifest`, :meth:`RunData.write`) and read
by evaluation and reconstruction (:meth:`RunData.read`): the input field and shapes, the
targets and their channels, the input channel names, and the physics a micrograph must
match (pixel size, Nyquist step, energy, zone, materials).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, ValidationError

from stemnet.atomic import write_atomic
from stemnet.errors import UserError


class RunData(BaseModel):
    """The dataset shapes and physics a run was trained on."""

    model_config = ConfigDict(extra="forbid")

    input_field: str  # "stem" or "cbed"
    input_shape: Tuple[int, int, int]  # (H, W, C) network input
    output_shape: Tuple[int, int]  # (H', W') label maps
    targets: List[str]
    channels: Dict[str, int]  # target -> channels
    config_digest: Optional[str] = None  # of the simulation config
    input_channels: List[str] = []  # detector names (STEM) or probe0.. (CBED), in channel order
    fov_ang: Optional[float] = None  # field of view [Å]
    pixel_size_ang: Optional[float] = None  # label-map pixel [Å]
    energy_ev: Optional[float] = None
    nyquist_step_ang: Optional[float] = None  # the probe's λ/(4α) [Å]
    zone: Optional[str] = None  # zone axis, e.g. "001"
    materials: Dict[str, Dict[str, Any]] = {}  # material name -> description (lattice "a" [Å], ...)

    @classmethod
    def from_manifest(cls, manifest: dict, targets) -> "RunData":
        """The contract of a model trained on ``targets`` of this dataset."""
        from stemnet.data import input_field, map_shape
        from stemnet.shards import header_fields, simulation_section

        fields = header_fields(manifest)
        missing = [t for t in targets if t not in fields]
        if missing:
            hint = " (simulate with simulation.tilt_labels: true)" if missing[0] == "tilt" else ""
            raise UserError(f"data.targets: {missing[0]!r} is not a field of this dataset ({sorted(fields)}); "
                            f"expected one of its label fields{hint}")
        name = input_field(manifest)
        c, h, w = fields[name].shape
        out_h, out_w = map_shape(manifest)
        sim = simulation_section(manifest)
        channels = sim.detectors if name == "stem" else [f"probe{p}" for p in range(c)]
        used = set(sim.specimen.materials)
        return cls(
            input_field=name, input_shape=(int(h), int(w), int(c)), output_shape=(int(out_h), int(out_w)),
            targets=list(targets), channels={t: int(fields[t].shape[0]) for t in targets},
            config_digest=manifest.get("config_digest"), input_channels=channels, fov_ang=sim.fov_ang,
            pixel_size_ang=sim.fov_ang / out_w if sim.fov_ang else None,
            energy_ev=sim.microscope.energy_ev, nyquist_step_ang=nyquist_step_ang(manifest),
            zone=sim.specimen.zone, materials={k: v for k, v in sim.materials.items() if k in used},
        )

    def write(self, path) -> Path:
        """``data.json`` at ``path``, atomically."""
        return write_atomic(path, json.dumps(self.model_dump(mode="json"), indent=1) + "\n")

    @classmethod
    def read(cls, path) -> "RunData":
        """``data.json`` from ``path``.

        Raises
        ------
        UserError
            Missing, unreadable, or an entry of the wrong type (one line naming it).
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such file; expected the data.json of a `stemnet train` run") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: unreadable ({error})") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: {loc}: {first['msg']}") from None


def nyquist_step_ang(manifest: dict) -> Optional[float]:
    """The probe's Nyquist step λ/(4α) [Å]: from the manifest's sampling record, else from
    the simulated energy and convergence semi-angle (relativistic wavelength)."""
    from stemnet.shards import simulation_section

    recorded = ((manifest.get("extra") or {}).get("sampling") or {}).get("nyquist_step_ang")
    if recorded:
        return float(recorded)
    mic = simulation_section(manifest).microscope
    energy, alpha = mic.energy_ev, mic.convergence_mrad
    if not energy or not alpha:
        return None
    wavelength = 12.2643 / math.sqrt(energy * (1 + 0.978476e-6 * energy))  # Å
    return wavelength / (4 * alpha * 1e-3)
