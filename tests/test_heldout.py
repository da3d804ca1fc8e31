"""The realistic micrographs' imperfections: training-like draws stay inside the dataset's
ranges; the held-out ones lie outside them (stemnet.reconstruct.heldout)."""

from pathlib import Path

import numpy as np
import pytest

from simulation import stem
from simulation.config import load_simulation
from stemnet.reconstruct import heldout

REPO = Path(__file__).resolve().parents[1]


def _demo_sim() -> dict:
    return load_simulation(REPO / "configs/simulation/demo.yaml").model_dump(mode="json")


def test_training_draws_lie_in_the_configured_ranges():
    sim = _demo_sim()
    imp = sim["imperfections"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = heldout.training_draws(sim, rng)
        assert set(d) == set(stem.IMPERFECTION_PARAMS)
        assert d["amorphous_ang"] == 0.0
        for name in stem.IMPERFECTION_PARAMS:
            key = stem.CONFIG_KEYS.get(name, name)
            if name.endswith("angle_deg") or name == "amorphous_ang":
                continue
            lo, hi = imp[key]
            assert lo <= d[name] <= hi, name
    a, b = heldout.training_draws(sim, np.random.default_rng(1)), heldout.training_draws(sim, np.random.default_rng(2))
    assert a["dose_e_per_ang2"] != b["dose_e_per_ang2"]


def test_training_draws_of_a_perfect_instrument_are_zero_with_unit_gain():
    sim = load_simulation(REPO / "configs/simulation/tiny_stem.yaml").model_dump(mode="json")
    d = heldout.training_draws(sim, np.random.default_rng(0))
    assert d["gain"] == 1.0 and d["dose_e_per_ang2"] > 0
    assert all(v == 0.0 for k, v in d.items() if k not in ("gain", "dose_e_per_ang2"))


def test_held_out_imperfections_lie_outside_the_training_ranges():
    sim = _demo_sim()
    imp = sim["imperfections"]
    assert heldout.IMPERFECTIONS["source_fwhm_ang"] > imp["source_fwhm_ang"][1]
    assert heldout.IMPERFECTIONS["gain"] > imp["gain"][1]
    assert heldout.IMPERFECTIONS["offset_frac"] > imp["offset_frac"][1]
    assert heldout.held_out_thickness(sim) > max(sim["specimen"]["thickness_cells"])
    assert heldout.held_out_thickness(sim) % 2 == 0


@pytest.mark.parametrize("held_out", [True, False])
def test_realistic_micrograph_meta_follows_its_kind(held_out, monkeypatch):
    """Without simulating (simulate_micrograph replaced by a recorder): the held-out kind
    gets the held-out thickness and no draws, the training-like kind a trained thickness
    and draws in range."""
    sim = _demo_sim()
    info = {"materials": sim["materials"], "input_channels": ["HAADF", "ABF"]}
    seen = {}

    def fake(material, cells, thickness, distortion, sim_, channels, rng, **kw):
        seen.update(cells=cells, thickness=thickness, draws=kw["draws"], channels=channels)
        n = int(round(material.a * cells / 2 / kw["pixel_ang"])) * 2
        return None, np.ones((len(channels), n, n)), kw["pixel_ang"], None

    monkeypatch.setattr(heldout, "simulate_micrograph", fake)
    _, mic, material, meta = heldout.realistic_micrograph(info, sim, np.random.default_rng(3), held_out=held_out,
                                                          glazer="a0a0c+")
    assert seen["channels"] == ["haadf", "abf"] and mic.data.shape[-1] >= 256
    assert seen["cells"] % 2 == 0 and seen["cells"] * material.a >= 25.6
    if held_out:
        assert seen["draws"] is None and meta["thickness_cells"] == heldout.held_out_thickness(sim)
        assert meta["tilt_deg"][2] >= 5.0
    else:
        lo, hi = sim["specimen"]["thickness_cells"]
        assert lo <= meta["thickness_cells"] <= hi and meta["thickness_cells"] % 2 == 0
        assert seen["draws"]["dose_e_per_ang2"] == meta["dose_e_per_ang2"]
