"""Staging a rank's shards to node-local storage; inspecting and plotting a dataset."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from conftest import poke
from stemnet.data import close_shards, make_dataset
from stemnet.errors import UserError
from stemnet.shards import FieldSpec, ShardError, ShardWriter, finalize_manifest, shard_path
from stemnet.stage import inspect_dataset, plot_samples, stage, staged_shards

META = {"generator": "test", "generator_version": "1", "config_digest": "d1", "seed": 3}
HW = 12


def fields(mode="cbed"):
    inputs = (4, 6, 6) if mode == "cbed" else (2, HW, HW)
    return {mode: FieldSpec(inputs, "<f4"), "potential": FieldSpec((1, HW, HW), "<f4"),
            "displacement": FieldSpec((9, HW, HW), "<f4"), "columns": FieldSpec((3, HW, HW), "<f4")}


def sample(index, spec):
    """Columns on a 4-pixel lattice; B columns displaced by (dx, dy) = (0.1, -0.05)·(index+1) Å."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:HW, :HW]
    out = {name: rng.random(s.shape, dtype=np.float32) for name, s in spec.items()}
    cols = np.zeros((3, HW, HW), np.float32)
    disp = np.zeros((9, HW, HW), np.float32)
    for s, (oy, ox) in enumerate([(0, 0), (2, 2), (0, 2)]):
        for cy in range(oy, HW, 4):
            for cx in range(ox, HW, 4):
                cols[s] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 1.0)
    disp[3] = 0.1 * (index + 1) * cols[1]
    disp[4] = -0.05 * (index + 1) * cols[1]
    out["columns"], out["displacement"] = cols, disp
    return out


def build(root, layout=None, mode="cbed", extra=None):
    layout = layout or {"train": (4, 3, 3), "val": (2,)}
    spec, index = fields(mode), 0
    for split, counts in layout.items():
        for k, count in enumerate(counts):
            with ShardWriter(shard_path(root, split, k), spec, ["index"], META) as writer:
                for _ in range(count):
                    writer.write(index, sample(index, spec), [index])
                    index += 1
    finalize_manifest(root, extra=extra)
    return root




def flip_last_byte(raw):
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


def indices_and_inputs(root, rank, world):
    out = []
    for x, t in make_dataset(root, rank=rank, world=world, batch_size=2, include_index=True, seed=9):
        out.append((t["index"].numpy().tolist(), t["weight"].numpy().tolist(), x.numpy()))
    return out


# ------------------------------------------------------------------------------ stage
def test_stage_copies_this_ranks_shards_and_trains_identically(tmp_path):
    src = build(tmp_path / "src")
    dest = stage(src, tmp_path / "nvme-{rank}", rank=1, world=2)
    assert dest == tmp_path / "nvme-1"
    on_disk = sorted(str(p.relative_to(dest)) for p in dest.rglob("shard-*.lmdb"))
    # train shards 0, 1, 2 round-robin over 2 ranks -> rank 1 reads shard 1; val has one shard
    # of 2 samples, strided over both ranks
    assert on_disk == ["train/shard-00001.lmdb", "val/shard-00000.lmdb"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["staged"]["rank"] == 1 and manifest["staged"]["shards"] == on_disk
    assert manifest["splits"] == json.loads((src / "manifest.json").read_text())["splits"]
    original = indices_and_inputs(src, 1, 2)
    close_shards()
    staged = indices_and_inputs(dest, 1, 2)
    assert len(original) == len(staged) == 4  # rank 0 reads shards 0 and 2 (7 samples): 4 batches of 2
    assert sum(sum(w) for _, w, _ in staged) == 3
    for (ia, wa, xa), (ib, wb, xb) in zip(original, staged):
        assert ia == ib and wa == wb
        np.testing.assert_array_equal(xa, xb)


def test_stage_is_rerunnable_and_refuses_other_ranks(tmp_path):
    src = build(tmp_path / "src")
    dest = stage(src, tmp_path / "bb", rank=0, world=2)
    mtime = (dest / "train/shard-00000.lmdb").stat().st_mtime_ns
    stage(src, tmp_path / "bb", rank=0, world=2)  # verified, not copied again
    assert (dest / "train/shard-00000.lmdb").stat().st_mtime_ns == mtime
    with pytest.raises(ShardError) as err:
        make_dataset(dest, rank=1, world=2, batch_size=2)
    assert "staged for rank 0 of 2" in str(err.value) and "\n" not in str(err.value)
    restaged = stage(src, tmp_path / "bb", rank=1, world=2)  # the other rank's shards replace them
    assert sorted(p.name for p in (restaged / "train").glob("*.lmdb")) == ["shard-00001.lmdb"]


def test_stage_rejects_corrupt_source_and_bad_arguments(tmp_path):
    src = build(tmp_path / "src")
    poke(shard_path(src, "train", 0), 1, flip_last_byte)
    with pytest.raises(ShardError) as err:
        stage(src, tmp_path / "bb", rank=0, world=2)
    message = str(err.value)
    assert "shard-00000.lmdb:0000000001" in message and "CRC" in message and "\n" not in message
    assert not (tmp_path / "bb/train/shard-00000.lmdb").exists()  # a bad copy is deleted
    with pytest.raises(UserError, match="10 samples but 11 ranks"):
        stage(src, tmp_path / "bb2", rank=0, world=11, splits=("train",))
    with pytest.raises(UserError, match="no manifest"):
        stage(tmp_path / "nothing", tmp_path / "bb3")
    other = build(tmp_path / "other")
    with pytest.raises(UserError, match="not staged"):
        stage(src, other)


def test_staged_shards_follow_the_training_assignment():
    manifest = {"splits": {"train": {"count": 7, "shards": [
        {"path": "train/shard-00000.lmdb", "count": 4}, {"path": "train/shard-00001.lmdb", "count": 3}]},
        "val": {"count": 0, "shards": []}}}
    assert staged_shards(manifest, rank=0, world=3) == ["train/shard-00000.lmdb"]
    assert staged_shards(manifest, rank=1, world=3) == ["train/shard-00001.lmdb"]
    assert staged_shards(manifest, rank=2, world=3) == ["train/shard-00000.lmdb"]


# ------------------------------------------------------------------------------ inspect
def test_inspect_describes_and_verifies(tmp_path):
    src = build(tmp_path / "src", extra={"simulation": {"mode": "cbed", "seed": 1, "cbed": {"grid": [2, 2], "k": 6}}})
    text, faults = inspect_dataset(src)
    assert faults == []
    words = " ".join(text.split())
    assert "train 10 samples in 3 shards (3..4 per shard)" in words
    assert "val 2 samples in 1 shards" in words
    assert "cbed <f4 [4, 6, 6]" in words
    assert "probe grid 2x2" in text and "mode cbed" in text
    assert "B_dx" in text  # per-channel displacement statistics
    text, faults = inspect_dataset(src, verify=True)
    assert faults == [] and "every record CRC-checked" in text
    poke(shard_path(src, "train", 2), 9, flip_last_byte)
    _, quick = inspect_dataset(src)
    assert quick == []  # headers are fine: only --verify reads every record
    _, faults = inspect_dataset(src, verify=True)
    assert len(faults) == 1 and "shard-00002.lmdb:0000000009" in faults[0] and "CRC" in faults[0]


def test_inspect_reports_missing_manifest_and_header_faults(tmp_path):
    text, faults = inspect_dataset(tmp_path / "none")
    assert len(faults) == 1 and "no manifest" in faults[0]
    src = build(tmp_path / "src")
    spec = fields()
    with ShardWriter(shard_path(src, "train", 0), spec, ["index"], META) as writer:
        writer.write(500, sample(500, spec), [500])
    _, faults = inspect_dataset(src)
    assert len(faults) == 1 and "shard-00000.lmdb" in faults[0] and "count 5" in faults[0]


def test_inspect_staged_folder_checks_only_its_shards(tmp_path):
    dest = stage(build(tmp_path / "src"), tmp_path / "bb", rank=0, world=2)
    text, faults = inspect_dataset(dest, verify=True)
    assert faults == [] and "staged: from" in text and "for rank 0 of 2" in text


@pytest.mark.parametrize("mode", ["cbed", "stem"])
def test_plot_samples_writes_a_montage(tmp_path, mode):
    import matplotlib.image

    src = build(tmp_path / mode, {"train": (3,)}, mode=mode)
    png = plot_samples(src, tmp_path / f"{mode}.png", n=2)
    image = matplotlib.image.imread(png)
    columns = 2 + 3  # two input panels (CBED: mean + one pattern; STEM: both detectors) + 3 maps
    assert image.shape[:2] == (int(2 * 2.6 * 100), int(columns * 2.6 * 100))
    assert image[..., :3].std() > 0.05  # not blank
