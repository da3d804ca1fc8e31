"""RUN/data.json as a typed contract (stemnet.train.rundata.RunData)."""

import json

import numpy as np
import pytest

from stemnet.errors import UserError
from stemnet.shards import FieldSpec, ShardWriter, finalize_manifest, read_manifest, shard_path, simulation_section
from stemnet.train.rundata import RunData

META = {"generator": "test", "generator_version": "1", "config_digest": "d9", "seed": 1}
SIM = {"mode": "stem", "fov_ang": 15.6, "stem": {"detectors": {"haadf": {}, "abf": {}}},
       "microscope": {"energy_ev": 200e3, "convergence_mrad": 20.0},
       "specimen": {"materials": ["SrTiO3"], "zone": "001"},
       "materials": {"SrTiO3": {"a": 3.905}, "BaTiO3": {"a": 4.0}}}


def build(root, sim=SIM):
    fields = {"stem": FieldSpec((2, 16, 16), "<f4"), "potential": FieldSpec((1, 32, 32), "<f4"),
              "displacement": FieldSpec((9, 32, 32), "<f4")}
    with ShardWriter(shard_path(root, "train", 0), fields, ["a_ang"], META) as writer:
        writer.write(0, {n: np.zeros(s.shape, np.float32) for n, s in fields.items()}, [3.9])
    finalize_manifest(root, extra={"simulation": sim} if sim else None)
    return read_manifest(root)


def test_from_manifest_round_trip(tmp_path):
    info = RunData.from_manifest(build(tmp_path / "d"), ["potential", "displacement"])
    assert info.input_field == "stem" and info.input_shape == (16, 16, 2) and info.output_shape == (32, 32)
    assert info.channels == {"potential": 1, "displacement": 9}
    assert info.input_channels == ["haadf", "abf"] and info.config_digest == "d9"
    assert info.pixel_size_ang == pytest.approx(15.6 / 32)
    assert info.nyquist_step_ang == pytest.approx(0.0251 / (4 * 0.020), rel=1e-2)  # λ(200 keV) = 0.0251 Å
    assert info.materials == {"SrTiO3": {"a": 3.905}} and info.zone == "001"
    path = info.write(tmp_path / "data.json")
    assert json.loads(path.read_text())["input_shape"] == [16, 16, 2]
    assert RunData.read(path) == info


def test_read_refuses_a_wrong_entry_in_one_line(tmp_path):
    info = RunData.from_manifest(build(tmp_path / "d"), ["potential"])
    raw = info.model_dump(mode="json")
    raw["input_shape"] = [16, 16]
    (tmp_path / "data.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"data.json: input_shape") as err:
        RunData.read(tmp_path / "data.json")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such file"):
        RunData.read(tmp_path / "missing.json")


def test_simulation_section_is_typed_and_optional(tmp_path):
    manifest = build(tmp_path / "d", sim=None)
    sim = simulation_section(manifest)
    assert not sim.present and sim.mode is None and sim.detectors == []
    info = RunData.from_manifest(manifest, ["potential"])
    assert info.input_channels == [] and info.pixel_size_ang is None and info.nyquist_step_ang is None
    bad = dict(manifest, extra={"simulation": {"fov_ang": "wide"}})
    with pytest.raises(UserError, match=r"extra.simulation.fov_ang"):
        simulation_section(bad)
