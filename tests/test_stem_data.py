"""STEM datasets that look like a microscope: Nyquist sampling refused/recorded, drawn
imperfections in params, tilt label maps, the held-out realistic micrograph."""

import json

import numpy as np
import pytest

from simulation import stem
from simulation.generator import generate, param_names, simulate_sample
from simulation.config import load_simulation
from stemnet.errors import UserError
from stemnet.shards import ShardReader, read_manifest

from conftest import REPO

TINY_STEM = REPO / "configs/simulation/tiny_stem.yaml"
REALISTIC = ["simulation.num_samples=2", "simulation.splits={train: 1.0, val: 0.0, test: 0.0}",
             "simulation.output_shape=[32, 32]", "simulation.scan_step_ang=null", "simulation.undersampled_ok=false",
             "simulation.imperfections={focal_points: 2}", "simulation.tilt_labels=true",
             "simulation.distortion.glazer=[a-a-c+]", "simulation.distortion.tilt_deg=[4.0, 8.0]",
             "simulation.specimen.thickness_cells=[2, 2]"]


def test_a_scan_coarser_than_nyquist_is_refused_before_anything_is_written(tmp_path):
    cfg = load_simulation(TINY_STEM, ["simulation.undersampled_ok=false"])
    out = tmp_path / "never"
    with pytest.raises(UserError) as err:
        generate(cfg, out, progress=False)
    message = str(err.value)
    assert "\n" not in message and "simulation.scan_step_ang: 0.4882" in message
    assert "Nyquist step 0.3135" in message and "undersampled_ok" in message
    assert not out.exists()
    cfg = load_simulation(TINY_STEM, ["simulation.undersampled_ok=false", "simulation.scan_step_ang=0.3"])
    with pytest.raises(UserError, match="simulation.output_shape: \\[16, 16\\] over fov_ang 7.81 Å gives 0.4881"):
        generate(cfg, out, progress=False)
    # the opt-in is recorded
    assert stem.check_sampling(load_simulation(TINY_STEM))["undersampled"] is True


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    cfg = load_simulation(TINY_STEM, REALISTIC)
    out = tmp_path_factory.mktemp("realistic") / "data"
    generate(cfg, out, progress=False)
    return cfg, out


def test_realistic_dataset_records_sampling_imperfections_and_tilt_maps(realistic):
    cfg, out = realistic
    manifest = read_manifest(out)
    sampling = manifest["extra"]["sampling"]
    assert sampling["pixel_size_ang"] == pytest.approx(7.81 / 32)
    assert sampling["nyquist_step_ang"] == pytest.approx(0.3135, abs=1e-4)
    assert sampling["scan_step_ang"] == sampling["nyquist_step_ang"] and sampling["undersampled"] is False
    shapes = {f["name"]: f["shape"] for f in manifest["fields"]}
    assert shapes["stem"] == [2, 32, 32] and shapes["tilt"] == [3, 32, 32]
    names = manifest["param_names"]
    assert names == param_names(cfg) and set(stem.IMPERFECTION_PARAMS) <= set(names)
    imp = cfg.imperfections
    with ShardReader(next(iter(sorted(out.glob("train/shard-*.lmdb"))))) as reader:
        for key in reader.keys():
            sample = reader.read(key)
            params = dict(zip(names, sample["params"]))
            for name in ("source_fwhm_ang", "coma_ang", "jitter_ang", "dose_e_per_ang2", "gain"):
                lo, hi = getattr(imp, name)
                assert lo <= params[name] <= hi
            assert params["scan_step_x_ang"] <= params["nyquist_step_ang"]
            # the tilt map carries the drawn angles with their signs, one value per cell
            tilt = sample["tilt"]
            np.testing.assert_allclose(np.abs(tilt).max(axis=(1, 2)),
                                       [params["tilt_deg_x"], params["tilt_deg_y"], params["tilt_deg_z"]], rtol=1e-6)
            assert (tilt[2] > 0).mean() == pytest.approx(0.5, abs=0.15)  # c+ alternates cell to cell
            # the drawn gain and offset are in the recorded images: dark pixels sit above the offset
            assert sample["stem"].min() >= 0.0 and np.all(np.isfinite(sample["stem"]))


def test_imperfections_change_the_images_and_are_a_pure_function_of_the_index(realistic):
    cfg, out = realistic
    first, params = simulate_sample(cfg, 0)
    with ShardReader(next(iter(sorted(out.glob("train/shard-*.lmdb"))))) as reader:
        stored = reader.read(reader.keys()[0])
    np.testing.assert_array_equal(first["stem"], stored["stem"])
    np.testing.assert_array_equal(params, stored["params"])
    perfect = cfg.model_copy(update={"imperfections": None})
    clean, clean_params = simulate_sample(perfect, 0)
    # the same specimen (imperfections are drawn after it), other images
    np.testing.assert_array_equal(params[:len(clean_params)], clean_params)
    assert np.abs(first["stem"] - clean["stem"]).mean() > 0.05 * clean["stem"].std()


def test_realistic_micrograph_with_truth(tmp_path):
    from simulation.micrograph import REALISTIC_IMPERFECTIONS, REALISTIC_SPECIMEN, make_realistic_micrograph
    from stemnet.reconstruct import read_images

    description = make_realistic_micrograph(tmp_path, pixels=48, thickness_cells=2, focal_points=1)
    (haadf,) = read_images(tmp_path / "haadf.hspy")
    assert haadf.data.shape == (48, 48) and haadf.pixel_size_ang == pytest.approx((0.09, 0.09))
    truth = np.load(tmp_path / "truth.npz")
    assert truth["tilt"].shape == (3, 48, 48) and truth["positions_ang"].shape == (48, 48, 2)
    np.testing.assert_allclose(np.abs(truth["tilt"]).max(axis=(1, 2)), REALISTIC_SPECIMEN["tilt_deg"])
    assert json.loads(str(truth["description"]))["imperfections"] == description["imperfections"]
    # the probe positions carry the drift: row i is shifted by -i * dx (plus jitter and flyback)
    shift = truth["positions_ang"][:, -1, 0] - truth["positions_ang"][0, -1, 0]
    slope = np.polyfit(np.arange(48), shift, 1)[0]
    assert slope == pytest.approx(-REALISTIC_IMPERFECTIONS["drift_x_ang_per_line"], abs=0.003)
    # gain and offset: recorded = gain * (noisy fraction) + offset
    noiseless = truth["noiseless"][0]
    assert haadf.data.mean() == pytest.approx(REALISTIC_IMPERFECTIONS["gain"] * noiseless.mean()
                                              + REALISTIC_IMPERFECTIONS["offset_frac"], rel=0.03)
    # every imperfection value lies outside what the demo trains on
    demo_cfg = load_simulation(REPO / "configs/simulation/demo.yaml")
    demo, demo_pixel = demo_cfg.imperfections, demo_cfg.fov_ang / max(demo_cfg.output_shape)
    for name, value in REALISTIC_IMPERFECTIONS.items():
        key = stem.CONFIG_KEYS.get(name, name)
        if name.endswith("_deg") or name == "amorphous_ang":
            continue
        lo, hi = getattr(demo, key)
        if name.startswith("drift_"):  # a strain: per line over the line spacing (0.09 Å here, the demo's 0.244 Å)
            value, lo, hi = value / 0.09, lo / demo_pixel, hi / demo_pixel
        assert not lo <= value <= hi, name
