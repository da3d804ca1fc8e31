"""The per-cell octahedral tilt maps as a trained target, end to end: simulate with tilt
labels, train a tilt head, evaluate it, reconstruct a micrograph with tilt columns, and
score it in ``bench sim2real`` against the truth of the specimen."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # `make test-all` (CI); see README, Tests

# tiny_stem with tilt labels and out-of-plane tilt systems, cheaper physics (as the
# reconstruction tests: HAADF 40-100 mrad allows 0.08 Å multislice sampling)
SIM_OVERRIDES = [
    "simulation.num_samples=12", "simulation.splits={train: 0.5, val: 0.25, test: 0.25}",
    "simulation.sampling_ang=0.08", "simulation.stem.detectors={haadf: [40.0, 100.0], abf: [10.0, 20.0]}",
    "simulation.specimen.thickness_cells=[2,2]", "simulation.distortion.glazer=[a-a-c0, a0a0c+]",
    "simulation.distortion.tilt_deg=[4.0,9.0]", "simulation.tilt_labels=true",
]
TRAIN_OVERRIDES = [
    "data.targets=[potential, displacement, tilt]", "model.heads={potential: 1, displacement: 9, tilt: 3}",
    "train.head_weights={potential: 1.0, displacement: 1.0, tilt: 1.0}", "train.steps=150",
    "train.learning_rate=0.003", "train.warmup_steps=0", "train.schedule=constant", "data.augment=false",
    "train.val_every=1000", "train.checkpoint_every=1000",
]


@pytest.fixture(scope="module")
def tilt_run(tmp_path_factory):
    from simulation.config import load_simulation
    from simulation.generator import generate
    from stemnet.config import load_config
    from stemnet.train.loop import train

    root = tmp_path_factory.mktemp("tilt")
    sim = load_simulation(REPO / "configs/simulation/tiny_stem.yaml", SIM_OVERRIDES)
    generate(sim, root / "data", workers=2, progress=False)
    cfg = load_config(REPO / "configs/training/tiny.yaml", TRAIN_OVERRIDES, require=("model", "train"))
    first = train(cfg, root / "data", root / "run", progress=False, max_steps=1)
    last = train(cfg, root / "data", root / "run", progress=False)
    return root / "run", root / "data", sim, first, last


def test_shipped_demo_trains_the_tilt_maps():
    from simulation.config import load_simulation
    from stemnet.config import load_config

    cfg = load_config(REPO / "configs/training/demo.yaml", require=("model", "train"))
    assert cfg.data.targets == ["potential", "displacement", "tilt"]
    assert cfg.model.heads["tilt"] == 3 and cfg.train.head_weights["tilt"] > 0
    assert load_simulation(REPO / "configs/simulation/demo.yaml").tilt_labels


def test_tilt_head_is_trained_and_recorded(tilt_run):
    """A 3-channel tilt head in degrees: data.json and the normalisation record it, its loss
    falls 3× on the training samples, and it beats the zero predictor there on every axis
    (measured: 0.85× of its MAE about x and y, 0.87× about z; at inference the batch-norm
    moving averages of 150 steps lag behind the training-mode loss)."""
    from stemnet.data import Normalization
    from stemnet.evaluate import evaluate
    from stemnet.train.run import load_run

    run, data, sim, first, last = tilt_run
    info = json.loads((run / "data.json").read_text())
    assert info["targets"] == ["potential", "displacement", "tilt"] and info["channels"]["tilt"] == 3
    model, _, _, norm = load_run(run)
    norm = Normalization.from_dict(norm)
    assert 2.0 < norm.tilt_scale < 9.0  # RMS of angles drawn in 4-9° (and zeros about z or x, y)
    out = model(np.zeros((2, 16, 16, 2), np.float32), training=False)
    assert tuple(out["tilt"].shape) == (2, 16, 16, 3)
    assert last["train_loss"]["tilt"] < first["train_loss"]["tilt"] / 3, (first["train_loss"], last["train_loss"])
    metrics = evaluate(run, data, "train")["metrics"]
    for axis in "xyz":
        key = f"tilt_map_mae_deg_{axis}"
        assert metrics["model"][key] < 0.95 * metrics["zero"][key], (axis, metrics["model"], metrics["zero"])
    assert metrics["zero"]["tilt_map_mae_deg_out_of_plane"] > 1.0  # a−a−c0 samples tilt about x and y


def test_reconstruction_has_tilt_columns(tilt_run, tmp_path):
    """A 4×4-cell a−a−c0 crystal (7°) imaged at the run's pixel size: the output holds the
    tilt maps (3 channels, degrees) and per B column the tilt about x, y, z with spread."""
    import h5py

    from simulation.multislice import stem_images
    from simulation.structures import build_specimen, material_from_dict
    from stemnet.reconstruct import reconstruct_files

    run, _, sim, _, _ = tilt_run
    spec = build_specimen(material_from_dict("SrTiO3", {"A": "Sr", "B": "Ti", "X": "O", "a": 3.905}), 4, 2,
                          glazer="a-a-c0", tilt_deg=(7.0, 7.0, 0.0))
    fov, n = float(spec.atoms.cell[0, 0]), 32
    mic = sim.microscope
    image = stem_images(spec.atoms, energy_ev=mic.energy_ev, convergence_mrad=mic.convergence_mrad, shape=(n, n),
                        fov_ang=((0.0, 0.0), (fov, fov)), sampling_ang=sim.sampling_ang,
                        slice_thickness_ang=spec.params["lattice_ang"][2] / 2, detectors=dict(sim.stem.detectors))
    np.save(tmp_path / "crystal.npy", image)
    (rec, hspy), = reconstruct_files(run, [tmp_path / "crystal.npy"], tmp_path / "out", pixel_size=fov / n,
                                     plot=False)
    assert rec.maps["tilt"].shape == rec.maps["potential"].shape[:2] + (3,)
    assert rec.spread["tilt"].shape == rec.maps["tilt"].shape and np.all(rec.spread["tilt"] >= 0)
    cols = rec.columns
    b = cols["sublattice"] == 1
    assert b.sum() >= 4
    for axis in "xyz":
        assert np.all(np.isfinite(cols[f"tilt_{axis}_deg"][b])) and np.all(np.isnan(cols[f"tilt_{axis}_deg"][~b]))
        assert np.all(cols[f"std_tilt_{axis}_deg"][b] >= 0)
    with h5py.File(hspy) as f:
        names = json.dumps(list(f["Experiments"].keys()))
    assert "tilt" in names
    csv = (tmp_path / "out" / "crystal_columns.csv").read_text().splitlines()[0]
    assert "tilt_x_deg" in csv and "tilt_y_deg" in csv and "tilt_z_deg" in csv


def test_truth_tilts_of_a_minus_a_minus_c0_are_the_requested_angles():
    """The benchmark's truth per B column (the labels' rule) for a−a−c0 6.5°: ±6.5° about x
    and y, 0 about z, within 0.2°, and as measured from the atoms (measure_tilts)."""
    from simulation.labels import find_columns
    from simulation.structures import build_specimen, material_from_dict, measure_tilts
    from stemnet.reconstruct.heldout import truth_tilts

    spec = build_specimen(material_from_dict("SrTiO3", {"A": "Sr", "B": "Ti", "X": "O", "a": 3.905}), 4, 2,
                          glazer="a-a-c0", tilt_deg=(6.5, 6.5, 0.0))
    cols = find_columns(spec)
    t = truth_tilts(spec, cols.xy[cols.sublattice == 1])
    assert t.shape == (16, 3)
    np.testing.assert_allclose(np.abs(t), np.broadcast_to([6.5, 6.5, 0.0], t.shape), atol=0.2)
    np.testing.assert_allclose(np.abs(t).mean(axis=0), measure_tilts(spec), atol=0.2)
    assert set(np.sign(t[:, 0])) == {-1.0, 1.0}  # anti-phase: the sign alternates cell to cell


def test_sim2real_scores_the_tilt_head_out_of_plane(tilt_run):
    """bench sim2real on the tiny tilt run, one a−a−c0 micrograph (64 px at 0.2 Å): the
    truth per B column is the requested angle about x and y (within 0.2°) and 0 about z;
    the network's tilt MAE in and out of plane is reported beside the zero baseline and the
    training split's constant mean (recomputed here from the shards); the B-only dx/dy RMSE
    lies above the A+B one (the network's A columns sit on the frame)."""
    from stemnet.reconstruct.benchmark import bench_sim2real

    run, data, _, _, _ = tilt_run
    result = bench_sim2real(run, data, samples=1, pixel_ang=0.2, min_px=64, glazer_systems=("a-a-c0",),
                            progress=False)
    row, = result["micrographs"]
    assert row["glazer"] == "a-a-c0" and row["pixels"] >= 64 and row["b_columns_matched"] >= 8
    requested = row["tilt_deg"]
    assert requested[0] == requested[1] and 6.5 <= requested[0] <= 9.0 and requested[2] == 0.0
    np.testing.assert_allclose(row["truth_mean_abs_tilt_deg"], requested, atol=0.2)
    assert result["tilt_mae_deg_out_of_plane_zero"] == pytest.approx(requested[0], abs=0.2)
    assert result["tilt_mae_deg_inplane_zero"] == pytest.approx(0.0, abs=0.2)
    # the constant baseline: the training split's mean |tilt| per axis, read here from the shards
    from stemnet.shards import ShardReader

    labels = []
    for shard in sorted((data / "train").glob("shard-*.lmdb")):
        with ShardReader(shard) as reader:
            labels += [np.asarray(reader.read(key)["tilt"], np.float64) for key in reader.keys()]
    mean = np.abs(np.stack(labels)).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(result["tilt_mean_target_deg"], mean, rtol=1e-4)
    assert result["tilt_mae_deg_out_of_plane_mean"] == pytest.approx(np.abs(mean[:2] - requested[0]).mean(), abs=0.2)
    assert result["tilt_mae_deg_inplane_mean"] == pytest.approx(mean[2], abs=0.2)
    # the B columns alone: the network's A columns sit on the frame (error ~0), so the pooled
    # A + B figure lies below the B-only one
    assert result["dxdy_rmse_pm_B_network"] > result["dxdy_rmse_pm_network"] > 0
    assert np.isfinite(result["dxdy_rmse_pm_B_gaussian_fit"])
    # a−a−c0 turns no octahedron about z: the O-based estimates' zero baselines are 0 on the
    # cells each one scored, and the fitted O columns give a finite error
    assert result["tilt_mae_deg_inplane_from_O_zero"] == pytest.approx(0.0, abs=0.2)
    assert result["tilt_mae_deg_inplane_from_O_gaussian_fit_zero"] == pytest.approx(0.0, abs=0.2)
    assert np.isfinite(result["tilt_mae_deg_inplane_from_O_gaussian_fit"])
    assert np.isfinite(result["dxdy_rmse_pm_O_gaussian_fit"])
    for key in ("dxdy_rmse_pm_network", "dxdy_rmse_pm_gaussian_fit", "tilt_mae_deg_inplane",
                "tilt_mae_deg_out_of_plane", "coverage_1sigma", "seam_ratio"):
        assert result[key] is not None and np.isfinite(result[key]), key
    print("\nsim2real (tiny tilt run):", json.dumps({k: v for k, v in result.items() if k.startswith("tilt")}))


def test_slope_reads_shrinkage():
    """The O-shift slope of bench sim2real: 1 for a full reading, 0.5 for half, sign kept."""
    from stemnet.reconstruct.benchmark import _slope

    truth = np.array([0.3, -0.2, 0.1, 0.0])
    assert _slope(truth, truth) == pytest.approx(1.0)
    assert _slope(0.5 * truth + np.array([0.0, 0.0, 0.0, 0.05]), truth) == pytest.approx(0.5)
    assert _slope(-truth, truth) == pytest.approx(-1.0)
    assert _slope(truth, np.zeros(4)) is None
