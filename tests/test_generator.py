"""The dataset generator: determinism, workers, ranks, resume after SIGKILL, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simulation.generator import generate, simulate_sample, split_ranges
from stemnet.errors import UserError
from stemnet.shards import ShardReader, read_manifest, verify_dataset

from conftest import TINY_SIMULATION

STEMNET = [sys.executable, "-m", "stemnet.cli"]


def all_records(root: Path) -> dict:
    """{index: raw record bytes} over every shard of a dataset."""
    records = {}
    for path in sorted(root.glob("*/shard-*.lmdb")):
        with ShardReader(path) as reader:
            for key in reader.keys():
                index = int(key)
                assert index not in records, f"sample {index} stored twice"
                records[index] = reader.read_raw(key)
    return records


def test_manifest_counts_and_fields(tiny_dataset, tiny_config):
    manifest = read_manifest(tiny_dataset)
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 6, "val": 3, "test": 3}
    shapes = {f["name"]: f["shape"] for f in manifest["fields"]}
    assert shapes == {"cbed": [9, 16, 16], "potential": [1, 16, 16], "displacement": [9, 16, 16],
                      "columns": [3, 16, 16]}
    assert manifest["extra"]["simulation"]["seed"] == tiny_config.seed
    assert verify_dataset(tiny_dataset) == []


def test_sample_is_physical(tiny_dataset):
    manifest = read_manifest(tiny_dataset)
    names = manifest["param_names"]
    with ShardReader(next(iter(sorted(tiny_dataset.glob("train/shard-*.lmdb"))))) as reader:
        sample = reader.read(reader.keys()[0])
    params = dict(zip(names, sample["params"]))
    # every CBED pattern keeps most of the beam inside 40 mrad, none more than all of it
    sums = sample["cbed"].sum(axis=(1, 2))
    assert np.all(sums > 0.8) and np.all(sums <= 1.0 + 1e-5)
    # projected potential is positive everywhere and peaks on columns
    assert sample["potential"].min() > 0
    # labels are relative to the A sublattice: A columns show 0, B columns polar_B - polar_A
    for sub, expected in ((0, [0.0, 0.0, 0.0]),
                          (1, [params[f"polar_B_ang_{a}"] - params[f"polar_A_ang_{a}"] for a in "xyz"])):
        mask = sample["columns"][sub]
        r, c = np.unravel_index(np.argmax(mask), mask.shape)
        measured = sample["displacement"][3 * sub:3 * sub + 3, r, c] / mask[r, c]
        np.testing.assert_allclose(measured, expected, atol=1e-4)
    assert np.abs(expected).max() > 0.01


@pytest.mark.slow
def test_same_samples_whatever_the_worker_count(tiny_dataset, tiny_config, tmp_path):
    """Two worker processes write other shards but byte-identical samples."""
    cfg = tiny_config.model_copy(update={"num_samples": 6, "splits": {"train": 1.0, "val": 0.0, "test": 0.0}})
    out = tmp_path / "two"
    summary = generate(cfg, out, workers=2, progress=False)
    assert summary["written"] == 6 and summary["finalized"]
    assert len(list(out.glob("train/shard-*.lmdb"))) == 2
    reference = all_records(tiny_dataset)
    mine = all_records(out)
    assert sorted(mine) == list(range(6))
    for index, raw in mine.items():
        assert raw == reference[index], f"sample {index} differs"


@pytest.mark.slow
def test_resume_after_sigkill(tiny_dataset, tmp_path):
    """SIGKILL mid-run: every shard opens, the rerun (other worker count) completes exactly."""
    out = tmp_path / "killed"
    cmd = STEMNET + ["simulate", "--config", str(TINY_SIMULATION), "--out", str(out), "--no-progress",
                     "--workers", "2", "-o", "simulation.shard.txn_samples=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until some samples are committed, then kill
        time.sleep(0.2)
        try:
            if sum(len(ShardReader(p, verify=False)) for p in out.glob("*/shard-*.lmdb")) >= 3:
                break
        except Exception:
            continue
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = all_records(out)  # every shard opens, every record passes its CRC
    assert 0 < len(partial) < 12
    rerun = subprocess.run(STEMNET + ["simulate", "--config", str(TINY_SIMULATION), "--out", str(out),
                                      "--no-progress", "-o", "simulation.shard.txn_samples=1"],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"simulated {12 - len(partial)} new of 12" in rerun.stdout
    assert all_records(out) == all_records(tiny_dataset)
    assert verify_dataset(out) == []


@pytest.mark.slow
def test_two_ranks_from_launcher_variables(tiny_dataset, tmp_path):
    """Two 'ranks' (SLURM_PROCID/SLURM_NTASKS) write their own shards; rank 0 finalizes."""
    out = tmp_path / "ranks"
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS="2")
        procs.append(subprocess.Popen(STEMNET + ["simulate", "--config", str(TINY_SIMULATION), "--out", str(out),
                                                 "--no-progress", "--wait", "120"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "manifest written" in outputs[0][0]
    assert sorted(p.name for p in out.glob("train/shard-*.lmdb")) == ["shard-00000.lmdb", "shard-00001.lmdb"]
    assert all_records(out) == all_records(tiny_dataset)
    assert read_manifest(out)["total"] == 12


def test_other_dataset_in_output_is_refused(tiny_dataset, tiny_config, tmp_path):
    out = tmp_path / "data"
    cfg = tiny_config.model_copy(update={"num_samples": 2, "splits": {"train": 1.0, "val": 0.0, "test": 0.0}})
    generate(cfg, out, progress=False)
    other = cfg.model_copy(update={"seed": 99})
    with pytest.raises(UserError, match=r"holds another dataset .*use overwrite"):
        generate(other, out, progress=False)
    summary = generate(other, out, overwrite=True, progress=False)
    assert summary["written"] == 2


def test_deterministic_sample_function(tiny_config):
    a, pa = simulate_sample(tiny_config, 3)
    b, pb = simulate_sample(tiny_config, 3)
    c, _ = simulate_sample(tiny_config, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a) and np.array_equal(pa, pb)
    assert not np.array_equal(a["cbed"], c["cbed"])


def test_split_ranges_cover_every_index(tiny_config):
    ranges = split_ranges(tiny_config)
    assert [list(r) for r in ranges.values()] == [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("override,message", [
    ("simulation.materials.SrTiO3.A=Xx", r"unknown .*element.*Xx|Xx.*element"),
    ("simulation.specimen.thickness_cells=[-2, 4]", r"simulation\.specimen\.thickness_cells\.0: expected a positive integer, got -2"),
    ("simulation.cbed.k=4096", r"k=4096 larger than the pattern"),
    ("simulation.fov_ang=40", r"simulation\.fov_ang: field of view 40 Å is larger than the specimen"),
    ("simulation.specimen.materials=[SrTiO3, Unobtainium]", r"unknown material 'Unobtainium'"),
])
def test_bad_input_is_one_line(tmp_path, override, message):
    proc = subprocess.run(STEMNET + ["simulate", "--config", str(TINY_SIMULATION), "--out", str(tmp_path / "d"),
                                     "--no-progress", "-o", override, "-o", "simulation.num_samples=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    import re
    assert re.search(message, lines[0]), lines[0]


def test_sample_unchanged_after_abtem_measure_planning(tiny_config):
    """FFTW wisdom from abTEM's default FFTW_MEASURE planning must not change a sample."""
    from simulation import multislice
    from simulation.generator import draw_specimen

    before, _ = simulate_sample(tiny_config, 0)
    specimen, _ = draw_specimen(tiny_config, 0)
    multislice.naive_abtem_cbed(specimen.atoms, energy_ev=2e5, convergence_mrad=20, grid=(1, 1),
                                fov_ang=((0, 0), (7.81, 7.81)), k=16, max_angle_mrad=40, sampling_ang=0.08,
                                slice_thickness_ang=1.95)
    after, _ = simulate_sample(tiny_config, 0)
    assert all(np.array_equal(before[k], after[k]) for k in before)
