"""The benchmarks run and report their ratios (figures are not asserted: speed is not tested)."""

import math

import pytest

from stemnet.bench import bench_grouping, bench_simulate, bench_train

from conftest import REPO, TINY_SIMULATION, TINY_TRAINING


def finite_positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_simulate_reports_both_ratios():
    result = bench_simulate(TINY_SIMULATION, samples=1, naive_grid=(1, 1), direct_pixel_ang=0.2)
    for key in ("ratio_vs_fft_floor", "ratio_vs_naive_abtem", "generator_patterns_per_s", "ratio_nyquist_vs_direct"):
        assert finite_positive(result[key]), key
    assert result["ratio_vs_fft_floor"] == pytest.approx(
        result["generator_patterns_per_s"] / result["fft_floor_patterns_per_s"])
    # the interpolated Nyquist scan equals the direct 0.2 Å scan (band-limited images)
    assert result["nyquist_vs_direct_rms_rel"] < 1e-3 and result["nyquist_vs_direct_pixels"] == [20, 20]


def test_bench_train_reports_both_ratios(tiny_dataset):
    result = bench_train(tiny_dataset, TINY_TRAINING, steps=2)
    assert finite_positive(result["ratio_vs_keras_fit"]) and finite_positive(result["ratio_bf16_vs_fp32"])
    assert result["batch"] == 4 and result["input_shape"] == [16, 16, 9]


@pytest.mark.slow
@pytest.mark.horovod
def test_bench_grouping_runs_two_ranks():
    result = bench_grouping(REPO / "configs/training/tiny.yaml", (16, 16, 2), batch=4, steps=2, backends=["horovod"])
    assert result["np2"]["graph"]["world"] == 2 and result["np1"]["none"]["world"] == 1
    for key in ("ratio_count4_vs_none", "ratio_layer_vs_none", "ratio_graph_vs_none", "efficiency_np2"):
        assert finite_positive(result[key]), key


@pytest.mark.slow
@pytest.mark.mwms
def test_bench_grouping_runs_two_mwms_workers():
    result = bench_grouping(REPO / "configs/training/tiny.yaml", (16, 16, 2), batch=4, steps=2, backends=["mwms"])
    assert result["mwms_np2"]["graph"]["world"] == 2 and result["mwms_np2"]["graph"]["backend"] == "mwms"
    assert result["mwms_np1"]["none"]["world"] == 1
    for key in ("ratio_count4_vs_none", "ratio_layer_vs_none", "ratio_graph_vs_none", "efficiency_np2"):
        assert finite_positive(result["mwms_" + key]), key


def test_synthetic_dataset_has_the_config_shapes_and_verifies(tmp_path):
    from stemnet.bench import synthetic_dataset
    from stemnet.data import close_shards, make_dataset
    from stemnet.shards import read_manifest, verify_dataset

    root = synthetic_dataset(tmp_path / "large", samples=5)
    manifest = read_manifest(root)
    assert manifest["splits"]["train"]["count"] == 5
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [3, 2]
    shapes = {f["name"]: f["shape"] for f in manifest["fields"]}
    assert shapes["cbed"] == [64, 32, 32] and shapes["displacement"] == [9, 32, 32]
    x, t = next(iter(make_dataset(root, batch_size=5, shuffle=False)))
    assert x.shape == (5, 32, 32, 64) and t["displacement"].shape == (5, 32, 32, 9)
    close_shards()
    assert verify_dataset(root) == []
