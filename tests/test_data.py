"""The training input pipeline (stemnet.data): assignment, values, augmentation, errors."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from conftest import poke
from stemnet.data import (
    Normalization,
    assign_shards,
    augment_sample,
    close_shards,
    corrupt_count,
    d4_array,
    make_dataset,
    one_line_errors,
    plan_split,
    tilt_target,
    user_error,
)
from stemnet.bench.data import bench_data
from stemnet.errors import UserError
from stemnet.shards import (
    FieldSpec,
    ShardError,
    ShardWriter,
    finalize_manifest,
    read_manifest,
    shard_path,
)

META = {"generator": "test", "generator_version": "1", "config_digest": "d1", "seed": 3}
ELEMENTS = [(t, fy, fx) for t in (0, 1) for fy in (0, 1) for fx in (0, 1)]


def make_fields(mode="cbed", grid=(2, 2), k=4, hw=8, detectors=3):
    inputs = (grid[0] * grid[1], k, k) if mode == "cbed" else (detectors, hw, hw)
    return {mode: FieldSpec(inputs, "<f4"), "potential": FieldSpec((1, hw, hw), "<f4"),
            "displacement": FieldSpec((9, hw, hw), "<f4"), "columns": FieldSpec((3, hw, hw), "<f4")}


def make_sample(index, fields):
    """Deterministic in ``index``; non-negative inputs; channel-dependent offsets."""
    rng = np.random.default_rng(index)
    sample = {}
    for name, (shape, _) in fields.items():
        offset = np.arange(shape[0], dtype=np.float32).reshape(-1, 1, 1)
        sample[name] = (rng.random(shape, dtype=np.float32) + offset).astype(np.float32)
    return sample


def build(root, counts=(5, 4), split="train", mode="cbed", fields=None, sample_fn=make_sample, extra=None, **kw):
    """A dataset whose shard k holds ``counts[k]`` samples; params = [index, 2*index]."""
    fields = fields or make_fields(mode, **kw)
    index = 0
    for k, count in enumerate(counts):
        with ShardWriter(shard_path(root, split, k), fields, ["index", "twice"], META) as writer:
            for _ in range(count):
                writer.write(index, sample_fn(index, fields), [index, 2 * index])
                index += 1
    finalize_manifest(root, extra=extra)
    return root



def batches(ds):
    return [(x.numpy(), {k: v.numpy() for k, v in t.items()}) for x, t in ds]


def real_indices(ds):
    out = []
    for _, t in batches(ds):
        out += t["index"][t["weight"] == 1].tolist()
    return out


# ------------------------------------------------------------------------ layout, values
def test_channels_last_values_and_normalization(tmp_path):
    root = build(tmp_path / "d")
    manifest = read_manifest(root)
    ds = make_dataset(root, batch_size=4, shuffle=False, cbed_normalization="none",
                      include_index=True, include_params=True)
    got = batches(ds)
    assert len(got) == 3 == ds.stemnet_plan.batches_per_epoch
    x, t = got[0]
    assert x.shape == (4, 4, 4, 4) and x.dtype == np.float32  # (B, K, K, P)
    assert t["potential"].shape == (4, 8, 8, 1)
    assert t["displacement"].shape == t["displacement_mask"].shape == (4, 8, 8, 9)
    assert t["weight"].tolist() == [1, 1, 1, 1]
    fields = make_fields()
    pot = manifest["stats"]["potential"]
    for b in range(4):
        i = int(t["index"][b])
        raw = make_sample(i, fields)
        np.testing.assert_array_equal(x[b], raw["cbed"].transpose(1, 2, 0))
        np.testing.assert_allclose(t["potential"][b, ..., 0], (raw["potential"][0] - pot["mean"]) / pot["std"],
                                   rtol=1e-5, atol=1e-5)
        scale = ds.stemnet_normalization.displacement_scale
        np.testing.assert_allclose(t["displacement"][b] * scale, raw["displacement"].transpose(1, 2, 0), rtol=1e-6)
        for c in range(9):
            np.testing.assert_array_equal(t["displacement_mask"][b, ..., c], raw["columns"][c // 3])
        assert t["params"][b].tolist() == [i, 2 * i]
    # last batch: 9 samples in 3 batches of 4 -> 3 weight-0 repeats at the end (no shuffle)
    assert got[2][1]["weight"].tolist() == [1, 0, 0, 0]


def test_cbed_normalizations_and_stem_standardization(tmp_path):
    root = build(tmp_path / "c")
    manifest = read_manifest(root)
    mean = manifest["stats"]["cbed"]["mean"]
    raw = make_sample(0, make_fields())["cbed"].transpose(1, 2, 0)
    first = {}
    for method in ("sqrt", "log1p", "standardize"):
        ds = make_dataset(root, batch_size=1, shuffle=False, cbed_normalization=method, include_index=True)
        x, t = next(iter(ds))
        assert int(t["index"][0]) == 0
        first[method] = x.numpy()[0]
        close_shards()
    np.testing.assert_allclose(first["sqrt"], np.sqrt(raw / mean), rtol=1e-5)
    np.testing.assert_allclose(first["log1p"], np.log1p(raw / mean), rtol=1e-5)
    pattern = first["standardize"][..., 2]
    assert abs(pattern.mean()) < 1e-5 and abs(pattern.std() - 1) < 1e-3

    stem = build(tmp_path / "s", mode="stem", counts=(6,))
    ds = make_dataset(stem, batch_size=6, shuffle=False)
    x = next(iter(ds))[0].numpy()
    assert x.shape == (6, 8, 8, 3)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0, atol=1e-4)  # per detector, whole split
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1, atol=1e-3)


def test_normalization_round_trip(tmp_path):
    root = build(tmp_path / "d")
    norm = Normalization.from_manifest(read_manifest(root), "sqrt")
    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    x = np.random.default_rng(0).random((2, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(again.denormalize_inputs(again.inputs(x)), x, rtol=1e-5, atol=1e-7)
    v = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32) + 3
    d = np.ones((2, 8, 8, 9), np.float32)
    back = again.denormalize({"potential": again.potential(v), "displacement": d})
    np.testing.assert_allclose(back["potential"], v, rtol=1e-5)
    # network units -> Å: the RMS displacement at column sites, from the statistics
    stats = read_manifest(root)["stats"]
    expected = np.sqrt((stats["displacement"]["std"] ** 2 + stats["displacement"]["mean"] ** 2) / stats["columns"]["mean"])
    assert norm.displacement_scale == pytest.approx(expected) and norm.displacement_scale != 1.0
    np.testing.assert_allclose(back["displacement"], d * expected, rtol=1e-6)
    # tilt: the head predicts magnitudes per axis, so a negative output is a magnitude of 0
    t = np.array([[-0.5, 0.0, 0.25]], np.float32)
    np.testing.assert_allclose(again.denormalize({"tilt": t})["tilt"], [[0.0, 0.0, 0.25 * again.tilt_scale]], rtol=1e-6)
    stem = Normalization.from_manifest(read_manifest(build(tmp_path / "s", mode="stem", counts=(3,))))
    assert stem.kind == "stem" and stem.method == "standardize" and len(stem.channel_mean) == 3
    y = np.random.default_rng(2).random((2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(stem.denormalize_inputs(stem.inputs(y)), y, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- ranks, coverage
@pytest.mark.parametrize("counts,world", [((5, 4), 1), ((5, 4), 2), ((5, 4), 3), ((3, 3, 2), 2)])
def test_every_sample_exactly_once_and_equal_batches(tmp_path, counts, world):
    root = build(tmp_path / "d", counts=counts)
    seen, nbatches = [], []
    for rank in range(world):
        ds = make_dataset(root, rank=rank, world=world, batch_size=2, seed=5, include_index=True)
        got = batches(ds)
        nbatches.append(len(got))
        mine, pads = [], []
        for _, t in got:
            assert t["weight"].shape == (2,)
            mine += t["index"][t["weight"] == 1].tolist()
            pads += t["index"][t["weight"] == 0].tolist()
        assert set(pads) <= set(mine)  # padding repeats this rank's own samples
        seen += mine
        close_shards()
    assert sorted(seen) == list(range(sum(counts)))
    assert len(set(nbatches)) == 1  # no rank runs out early
    assert nbatches[0] == -(-max(plan_split(read_manifest(root), "train", rank=0, world=world,
                                            batch_size=2).rank_samples) // 2)


def test_assignment_round_robin_and_strided():
    manifest = {"splits": {"train": {"count": 9, "shards": [
        {"path": "train/shard-00000.lmdb", "count": 5}, {"path": "train/shard-00001.lmdb", "count": 4}]}}}
    per = assign_shards(manifest, "train", 0, 3)
    assert [[(p.path[-10:-5], p.offset, p.stride, p.count) for p in r] for r in per] == [
        [("00000", 0, 2, 3)], [("00001", 0, 1, 4)], [("00000", 1, 2, 2)]]
    per = assign_shards(manifest, "train", 0, 1)
    assert [p.count for p in per[0]] == [5, 4]


def test_padding_repeats_own_samples(tmp_path):
    root = build(tmp_path / "d", counts=(5, 2))  # rank 0: 5 samples, rank 1: 2 -> 3 pads
    ds = make_dataset(root, rank=1, world=2, batch_size=5, include_index=True)
    (x, t), = batches(ds)
    assert sorted(t["index"][t["weight"] == 1].tolist()) == [5, 6]
    assert set(t["index"][t["weight"] == 0].tolist()) <= {5, 6} and (t["weight"] == 0).sum() == 3


def test_seeded_determinism_and_repeat(tmp_path):
    root = build(tmp_path / "d", counts=(6, 6))
    kw = dict(batch_size=3, augment=True, noise_std=0.1, include_index=True, repeat=2)
    a = batches(make_dataset(root, seed=1, **kw))
    b = batches(make_dataset(root, seed=1, num_parallel_calls=2, **kw))
    c = batches(make_dataset(root, seed=2, **kw))
    assert len(a) == 8  # two epochs of 4 batches
    for (xa, ta), (xb, tb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ta["displacement"], tb["displacement"])
    order = lambda runs: [i for _, t in runs for i in t["index"].tolist()]
    assert order(a) != order(c)
    assert sorted(order(a)[:12]) == sorted(order(c)[:12]) == list(range(12))
    assert order(a)[:12] != order(a)[12:]  # a new order each epoch
    fast = batches(make_dataset(root, seed=1, deterministic=False, **kw))
    assert sorted(order(fast)) == sorted(order(a))
    resumed = batches(make_dataset(root, seed=1, epoch=1, start_batch=2, **kw))
    np.testing.assert_array_equal(resumed[0][0], a[6][0])  # epoch 1, batch 2


# ------------------------------------------------------------------------ augmentation
def blob(hw, y, x, sigma=0.8):
    yy, xx = np.mgrid[:hw, :hw]
    return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_displacement_follows_the_moved_column():
    """A column at ideal (row 5, col 9) displaced by dx=+2, dy=+1 pixels: after every
    symmetry, the displacement read at the (transformed) ideal site points from the
    site to where the (transformed) column is."""
    hw = 16
    ideal = blob(hw, 5, 9)
    moved = blob(hw, 6, 11)  # +1 row (y), +2 columns (x)
    disp = np.zeros((9, hw, hw), np.float32)
    disp[3], disp[4], disp[5] = 2.0 * ideal, 1.0 * ideal, 0.3 * ideal  # B sublattice, in "pixels"
    columns = np.stack([0 * ideal, ideal, 0 * ideal])
    sample = {"potential": moved[None], "displacement": disp, "columns": columns}
    directions = set()
    for element in ELEMENTS:
        out = augment_sample(sample, element)
        site = np.unravel_index(np.argmax(out["columns"][1]), (hw, hw))
        atom = np.unravel_index(np.argmax(out["potential"][0]), (hw, hw))
        dx, dy, dz = out["displacement"][3:6, site[0], site[1]]
        assert (atom[1] - site[1], atom[0] - site[0]) == pytest.approx((dx, dy)), element
        assert dz == pytest.approx(0.3)
        directions.add((round(float(dx)), round(float(dy))))
    assert len(directions) == 8  # the eight images of (2, 1) under the square's symmetries
    # np.rot90 (counter-clockwise on screen, rows down) is transpose then flip y: (dx, dy) -> (dy, -dx)
    rot = augment_sample(sample, (1, 1, 0))
    np.testing.assert_array_equal(rot["potential"][0], np.rot90(moved))
    site = np.unravel_index(np.argmax(rot["columns"][1]), (hw, hw))
    assert rot["displacement"][3:5, site[0], site[1]] == pytest.approx([1.0, -2.0])


def test_tilt_turns_as_an_axial_vector_not_a_polar_one():
    """augment_sample moves the tilt map with the symmetry and turns the angles about
    (x, y, z) as an axial vector, det(R)·R·t: a mirror of x keeps the tilt about x and
    flips those about y and z, where a polar vector (dx, dy, dz) would flip dx only."""
    hw = 8
    t = np.stack([np.full((hw, hw), v, np.float32) for v in (1.0, 2.0, 3.0)])
    t[:, 0, 0] = (5.0, 6.0, 7.0)  # one marked pixel follows the map
    expected = {  # element -> (tilt at every pixel, the marked pixel's new [row, col])
        (0, 0, 0): ((1, 2, 3), (0, 0)), (0, 0, 1): ((1, -2, -3), (0, 7)), (0, 1, 0): ((-1, 2, -3), (7, 0)),
        (0, 1, 1): ((-1, -2, 3), (7, 7)), (1, 0, 0): ((-2, -1, -3), (0, 0)), (1, 1, 0): ((2, -1, 3), (7, 0)),
        (1, 0, 1): ((-2, 1, 3), (0, 7)), (1, 1, 1): ((2, 1, -3), (7, 7)),
    }
    polar_like = 0
    for element, (values, (r, c)) in expected.items():
        out = augment_sample({"tilt": t}, element)["tilt"]
        np.testing.assert_array_equal(out[:, 4, 3], values, err_msg=str(element))
        assert abs(out[2, r, c]) == 7.0, element
        det = (-1) ** sum(element)  # rotations keep the tilt about the beam, mirrors flip it
        assert out[2, 4, 3] == det * 3.0
        # the same element on a polar vector (dx, dy, dz) of the B sublattice
        d = np.zeros((9, hw, hw), np.float32)
        d[3:6] = t
        polar = augment_sample({"displacement": d}, element)["displacement"][3:6, 4, 3]
        polar_like += np.array_equal(polar, out[:, 4, 3])
    assert polar_like == 4  # only the four rotations agree with a polar transform


def cbed_of(potential, n, origin):
    """A toy 4D-STEM forward model with the true symmetry behaviour: the pattern of probe
    (iy, ix) is the s x s patch of the map centred on the probe, indexed [ky, kx]."""
    hw = potential.shape[0]
    s = hw // n
    out = np.empty((n, n, s, s), np.float32)
    for iy in range(n):
        for ix in range(n):
            cy, cx = ((iy + 0.5) * s, (ix + 0.5) * s) if origin == "center" else (iy * s, ix * s)
            rolled = np.roll(potential, (-int(cy - s / 2), -int(cx - s / 2)), axis=(0, 1))
            out[iy, ix] = rolled[:s, :s]
    return out.reshape(n * n, s, s)


@pytest.mark.parametrize("origin", ["center", "corner"])
def test_cbed_transforms_probe_grid_and_patterns_together(origin):
    n, hw = 4, 16
    v = np.random.default_rng(0).random((hw, hw)).astype(np.float32)
    stack = cbed_of(v, n, origin)
    for element in ELEMENTS:
        seen = augment_sample({"cbed": stack}, element, grid=(n, n), probe_grid_origin=origin)["cbed"]
        expected = cbed_of(np.ascontiguousarray(d4_array(v, element)), n, origin)
        np.testing.assert_array_equal(seen, expected, err_msg=str(element))


def test_pipeline_applies_the_reference_transform(tmp_path):
    """The compiled gather (GatherTables) makes exactly what augment_sample makes, and the
    tilt target is the magnitude of the moved tilt labels (channel-dependent offsets make a
    swapped channel show; a mirror negates positive labels, so a missing magnitude shows)."""
    fields = dict(make_fields(), tilt=FieldSpec((3, 8, 8), "<f4"))
    root = build(tmp_path / "d", counts=(24, 24), fields=fields)
    norm = Normalization.from_manifest(read_manifest(root), "none")
    assert norm.tilt_scale > 1.0  # RMS of the offsets 0, 1, 2 + U(0, 1)
    pot = norm.potential_mean, norm.potential_std
    ds = make_dataset(root, batch_size=8, augment=True, cbed_normalization="none", include_index=True, seed=4,
                      targets=("potential", "displacement", "tilt"))
    used = set()
    for x, t in batches(ds):
        for b in range(len(x)):
            raw = make_sample(int(t["index"][b]), fields)
            matches = []
            for element in ELEMENTS:
                ref = augment_sample(raw, element, grid=(2, 2))
                if (np.array_equal(x[b], ref["cbed"].transpose(1, 2, 0))
                        and np.allclose(t["potential"][b, ..., 0] * pot[1] + pot[0], ref["potential"][0], atol=1e-5)
                        and np.allclose(t["displacement"][b] * norm.displacement_scale,
                                        ref["displacement"].transpose(1, 2, 0), rtol=1e-6, atol=1e-7)
                        and np.array_equal(t["displacement_mask"][b, ..., 3], ref["columns"][1])
                        and np.allclose(t["tilt"][b] * norm.tilt_scale, tilt_target(ref["tilt"]).transpose(1, 2, 0),
                                        rtol=1e-6, atol=1e-6)):
                    matches.append(element)
            assert len(matches) == 1, matches
            used.add(matches[0])
    assert len(used) >= 6  # 48 draws from 8 elements


def test_noise_is_added_after_normalization(tmp_path):
    root = build(tmp_path / "d", counts=(8,))
    clean = next(iter(make_dataset(root, batch_size=8, shuffle=False)))[0].numpy()
    noisy = next(iter(make_dataset(root, batch_size=8, shuffle=False, noise_std=0.5)))[0].numpy()
    assert (noisy - clean).std() == pytest.approx(0.5, rel=0.05)


# ------------------------------------------------------------------------ bad input
def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_manifest(tmp_path):
    with pytest.raises(UserError) as err:
        make_dataset(tmp_path, batch_size=2)
    assert "manifest" in one_line(err)


def test_unknown_target_empty_split_too_many_ranks(tmp_path):
    root = build(tmp_path / "d")
    with pytest.raises(UserError) as err:
        make_dataset(root, batch_size=2, targets=("potential", "strain"))
    assert "'strain'" in one_line(err)
    with pytest.raises(UserError) as err:
        make_dataset(root, "val", batch_size=2)
    assert "'val' has no samples" in one_line(err)
    with pytest.raises(UserError) as err:
        make_dataset(root, batch_size=2, rank=0, world=10)
    assert "9 samples but 10 ranks" in one_line(err)


def test_header_disagreeing_with_manifest(tmp_path):
    root = build(tmp_path / "d")
    fields = make_fields()
    with ShardWriter(shard_path(root, "train", 1), fields, ["index", "twice"], META) as writer:
        writer.write(99, make_sample(99, fields), [99, 198])  # after finalize
    with pytest.raises(ShardError) as err:
        make_dataset(root, batch_size=2)
    message = one_line(err)
    assert "shard-00001.lmdb" in message and "count 5" in message



@pytest.mark.parametrize("damage,reason", [
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), "CRC mismatch"),
    (lambda raw: raw[: len(raw) // 2], "truncated record"),
])
def test_corrupt_record_raises_or_is_skipped(tmp_path, damage, reason):
    root = build(tmp_path / "d")
    poke(shard_path(root, "train", 1), 6, damage)
    ds = make_dataset(root, batch_size=3, include_index=True)
    with pytest.raises(tf.errors.OpError) as err:
        batches(ds)
    found = user_error(err.value)
    assert found is not None and "\n" not in str(found)
    assert "shard-00001.lmdb:0000000006" in str(found) and reason in str(found)
    with pytest.raises(ShardError, match="0000000006"):
        with one_line_errors():
            batches(ds)
    close_shards()
    skipping = make_dataset(root, batch_size=3, include_index=True, skip_corrupt=True)
    assert sorted(real_indices(skipping)) == [0, 1, 2, 3, 4, 5, 7, 8]
    assert corrupt_count(skipping) == 1
    if reason == "CRC mismatch":  # CRC checks can be turned off
        close_shards()
        assert sorted(real_indices(make_dataset(root, batch_size=3, include_index=True,
                                                verify_crc=False))) == list(range(9))


def test_non_finite_values_name_shard_and_key(tmp_path):
    def with_nan(index, fields):
        sample = make_sample(index, fields)
        if index == 2:
            sample["potential"][0, 3, 3] = np.nan
        return sample

    root = build(tmp_path / "d", sample_fn=with_nan)
    with pytest.raises(tf.errors.OpError) as err:
        batches(make_dataset(root, batch_size=3))
    message = str(user_error(err.value))
    assert "shard-00000.lmdb:0000000002" in message and "non-finite" in message and "potential" in message


# ------------------------------------------------------------------------ benchmark
def test_bench_data_reports_rates_on_the_same_samples(tmp_path):
    root = build(tmp_path / "d", counts=(8, 8))
    result = bench_data(root, batch_size=4, batches=4, tmpdir=tmp_path)
    assert result["samples"] == 16
    assert result["bytes_per_sample"] == 24 + (4 * 16 + 64 + 9 * 64 + 3 * 64) * 4 + 2 * 8
    for key in ("pipeline_samples_per_s", "raw_lmdb_samples_per_s", "h5py_samples_per_s"):
        assert result[key] > 0
    assert result["ratio_vs_raw_lmdb"] == pytest.approx(
        result["pipeline_samples_per_s"] / result["raw_lmdb_samples_per_s"])
    assert "ratio_vs_train_step" not in result and "cold" not in result
    assert result["ceiling_samples_per_s"] > 0
    assert result["ratio_vs_necessary_work"] == pytest.approx(
        result["pipeline_samples_per_s"] / result["necessary_work_samples_per_s"])
    assert result["checksum_backend"] == "isal" and result["checksum_gb_per_s"] > 0
    assert result["checksum_zlib_gb_per_s"] > 0
    with_train = bench_data(root, batch_size=4, batches=2, train_step_rate=100.0, tmpdir=tmp_path, cold=True)
    assert with_train["ratio_vs_train_step"] == pytest.approx(with_train["pipeline_samples_per_s"] / 100.0)
    cold = with_train["cold"]
    assert cold["samples"] == 4 * (16 // 4 - 2)  # the rest of the first epoch after 2 warm-up batches
    assert cold["ratio_vs_h5py"] == pytest.approx(cold["pipeline_samples_per_s"] / cold["h5py_samples_per_s"])


def test_per_pattern_standardization_follows_the_permuted_probe_grid(tmp_path):
    """Pattern p holds values in [p, p+1): statistics taken from the wrong pattern after a
    symmetry permutes the probe grid would leave a non-zero mean."""
    root = build(tmp_path / "d", counts=(16,))
    for x, _ in make_dataset(root, batch_size=8, augment=True, cbed_normalization="standardize", seed=2):
        x = x.numpy()
        np.testing.assert_allclose(x.mean(axis=(1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(x.std(axis=(1, 2)), 1, atol=1e-3)


def test_pipeline_and_numpy_normalizations_agree(tmp_path):
    """The pipeline's compiled pass and ``Normalization.inputs`` (used on experimental
    data at reconstruction) must normalise identically."""
    root = build(tmp_path / "c")
    manifest = read_manifest(root)
    raw = np.stack([make_sample(i, make_fields())["cbed"].transpose(1, 2, 0) for i in range(4)])
    for method in ("none", "sqrt", "log1p", "standardize"):
        norm = Normalization.from_manifest(manifest, method)
        x = next(iter(make_dataset(root, batch_size=4, shuffle=False, cbed_normalization=method)))[0].numpy()
        np.testing.assert_allclose(x, norm.inputs(raw), rtol=1e-5, atol=1e-6)
        close_shards()
    stem_root = build(tmp_path / "s", mode="stem", counts=(3,))
    stem = Normalization.from_manifest(read_manifest(stem_root))
    y = np.stack([make_sample(i, make_fields("stem"))["stem"].transpose(1, 2, 0) for i in range(3)])
    x = next(iter(make_dataset(stem_root, batch_size=3, shuffle=False)))[0].numpy()
    np.testing.assert_allclose(x, stem.inputs(y), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="cbed_normalization 'cube'"):
        Normalization.from_manifest(manifest, "cube")


def test_rectangular_probe_grid_gets_flips_only(tmp_path):
    root = build(tmp_path / "r", counts=(16,), grid=(3, 2))  # 6 patterns: not a square grid
    with pytest.raises(UserError, match="pass probe_grid"):
        make_dataset(root, batch_size=4, augment=True)
    fields = make_fields(grid=(3, 2))
    for kwargs in ({"probe_grid": (3, 2)}, {}):
        if not kwargs:  # the grid can also come from the simulation config in the manifest
            root = build(tmp_path / "r2", counts=(16,), grid=(3, 2),
                         extra={"simulation": {"mode": "cbed", "cbed": {"grid": [3, 2]}}})
        ds = make_dataset(root, batch_size=4, augment=True, cbed_normalization="none",
                          include_index=True, seed=1, **kwargs)
        used = set()
        for x, t in batches(ds):
            for b in range(4):
                raw = make_sample(int(t["index"][b]), fields)
                found = [e for e in ELEMENTS
                         if np.array_equal(x[b], augment_sample(raw, e, grid=(3, 2))["cbed"].transpose(1, 2, 0))]
                assert len(found) == 1 and found[0][0] == 0  # never a transpose
                used.add(found[0])
        assert len(used) == 4
        close_shards()


def test_necessary_work_floor_checks_every_record(tmp_path):
    """The numpy floor of ``bench data`` really checks what the pipeline checks: a
    record with a flipped payload byte fails its CRC there too; its copies are
    channels-last."""
    from stemnet.bench.data import _time_necessary
    from stemnet.data import dataset_loader
    from stemnet.shards import sample_key

    root = build(tmp_path / "d", counts=(4,))
    loader = dataset_loader(make_dataset(root, batch_size=2))
    shard_of = np.zeros(4, np.int32)
    keys = [sample_key(i) for i in range(4)]
    assert _time_necessary(loader, shard_of, keys) > 0
    close_shards()
    poke(root / "train/shard-00000.lmdb", 2, lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]))
    loader = dataset_loader(make_dataset(root, batch_size=2))
    with pytest.raises(ShardError, match="CRC mismatch"):
        _time_necessary(loader, shard_of, keys)
