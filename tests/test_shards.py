"""Tests of the sharded-LMDB format (stemnet.shards)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest

from stemnet.shards import (
    HEADER_KEY,
    MAGIC,
    RECORD_HEADER,
    FieldSpec,
    RunningStats,
    ShardError,
    ShardReader,
    ShardWriter,
    decode_record,
    finalize_manifest,
    read_manifest,
    sample_key,
    shard_path,
    verify_dataset,
)

FIELDS = {
    "displacement": FieldSpec((9, 8, 8), "<f4"),
    "potential": FieldSpec((1, 8, 8), "<f4"),
    "stem": FieldSpec((4, 6, 6), "<f4"),
}
PARAM_NAMES = ["a_ang", "tilt_deg", "thickness_ang"]
META = {"generator": "test", "generator_version": "1", "config_digest": "abc123", "seed": 7}
SAMPLE_BYTES = (9 * 64 + 64 + 4 * 36) * 4 + 3 * 8
TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def make_sample(index, offset=0.0):
    """Deterministic sample ``index``: per-channel offsets, so channels differ."""
    rng = np.random.default_rng(index)
    sample = {}
    for name, (shape, dtype) in FIELDS.items():
        channel = np.arange(shape[0], dtype=np.float64).reshape(-1, 1, 1)
        values = offset + 10.0 * channel + rng.normal(size=shape)
        sample[name] = values.astype(dtype)
    params = rng.uniform(size=len(PARAM_NAMES)) + index
    return sample, params


def write_shard(path, indices, offset=0.0, meta=META, **kwargs):
    with ShardWriter(path, FIELDS, PARAM_NAMES, meta, **kwargs) as writer:
        for i in indices:
            writer.write(i, *make_sample(i, offset))
    return path


def poke(path, key, transform):
    """Rewrite the stored value of ``key`` as ``transform(old_bytes)`` through LMDB."""
    env = lmdb.open(str(path), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(key, transform(bytes(txn.get(key))))
    env.close()


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- records
def test_round_trip_is_byte_identical_little_endian_and_unpickled(tmp_path):
    path = shard_path(tmp_path, "train", 0)
    big_endian = make_sample(3)[0]
    big_endian["stem"] = big_endian["stem"].astype(">f4")  # stored little-endian all the same
    with ShardWriter(path, FIELDS, PARAM_NAMES, META, txn_samples=8) as writer:
        for i in range(20):
            sample, params = make_sample(i)
            writer.write(i, big_endian if i == 3 else sample, params)
    with ShardReader(path) as reader:
        assert len(reader) == 20
        assert reader.keys() == [b"%010d" % i for i in range(20)]
        assert [f["dtype"] for f in reader.header["fields"]] == ["<f4"] * 3
        for i in range(20):
            sample, params = make_sample(i)
            got = reader.read(i)
            assert set(got) == set(FIELDS) | {"params"}
            for name in FIELDS:
                assert got[name].dtype == np.dtype("<f4") and got[name].shape == FIELDS[name].shape
                assert got[name].tobytes() == sample[name].astype("<f4").tobytes()
                assert not got[name].flags.writeable  # a view on the record, not a copy
            np.testing.assert_array_equal(got["params"], params)
            raw = reader.read_raw(sample_key(i))
            magic, version, _flags, length, crc = RECORD_HEADER.unpack_from(raw)
            payload = raw[RECORD_HEADER.size:]
            assert raw[:4] == MAGIC == magic and version == 1
            assert length == len(payload) == SAMPLE_BYTES and crc == zlib.crc32(payload)
            expected = b"".join(sample[n].astype("<f4").tobytes() for n in FIELDS)
            assert payload == expected + np.asarray(params, "<f8").tobytes()
            standalone = decode_record(reader.header, raw, where="x")
            assert standalone["stem"].tobytes() == got["stem"].tobytes()


def test_crc_corruption_is_detected_naming_shard_and_key(tmp_path):
    path = write_shard(shard_path(tmp_path, "train", 0), range(6))
    finalize_manifest(tmp_path)
    assert verify_dataset(tmp_path) == []
    flip = RECORD_HEADER.size + 100

    poke(path, sample_key(3), lambda raw: raw[:flip] + bytes([raw[flip] ^ 0x01]) + raw[flip + 1:])
    with ShardReader(path) as reader:
        reader.read(2)  # the neighbours are fine
        with pytest.raises(ShardError, match="CRC mismatch") as excinfo:
            reader.read(3)
        message = one_line_error(excinfo)
        assert str(path) in message and "0000000003" in message
    with ShardReader(path, verify=False) as reader:
        assert reader.read(3)["displacement"].tobytes() != make_sample(3)[0]["displacement"].tobytes()
    faults = verify_dataset(tmp_path)
    assert len(faults) == 1 and "0000000003" in faults[0] and "CRC" in faults[0]


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda raw: raw[:-5], "truncated record"),
        (lambda raw: raw[:10], "truncated record"),
        (lambda raw: b"\x80\x04" + raw[2:], "bad record magic"),  # a pickle's first bytes
        (lambda raw: raw[:4] + struct.pack("<H", 9) + raw[6:], "format version 9"),
    ],
)
def test_damaged_record_is_detected(tmp_path, damage, expected):
    path = write_shard(shard_path(tmp_path, "val", 0), range(3))
    poke(path, sample_key(1), damage)
    with ShardReader(path) as reader, pytest.raises(ShardError, match=expected) as excinfo:
        reader.read(1)
    assert f"{path}:0000000001" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- writer
def test_tiny_initial_map_size_grows_and_keeps_every_record(tmp_path):
    path = shard_path(tmp_path, "train", 0)
    n = 64  # 64 samples x 3.2 kB = 205 kB through a 64 KiB initial map
    with ShardWriter(path, FIELDS, PARAM_NAMES, META, txn_samples=8, map_size=1 << 16) as writer:
        for i in range(n):
            writer.write(i, *make_sample(i))
        grown = writer.map_size
    assert grown >= n * SAMPLE_BYTES > 1 << 16
    with ShardReader(path) as reader:
        assert len(reader) == len(reader.keys()) == n
        for i in range(n):
            assert reader.read(i)["displacement"].tobytes() == make_sample(i)[0]["displacement"].tobytes()


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_shards import FIELDS, META, PARAM_NAMES, make_sample
from stemnet.shards import ShardWriter
with ShardWriter({path!r}, FIELDS, PARAM_NAMES, META, txn_samples=4, map_size=1 << 16) as writer:
    for i in range({n}):
        writer.write(i, *make_sample(i))
        print(i, flush=True)
        time.sleep({pause})
"""


@pytest.mark.parametrize("pause, delay", [(0.004, 0.0), (0.0, 0.03)], ids=["idle", "busy"])
def test_writer_killed_mid_write_leaves_a_consistent_resumable_shard(tmp_path, pause, delay):
    """SIGKILL between samples, or some ms later while the writer is busy encoding/committing."""
    n, kill_after = 400, 31  # sample 31 ends a transaction of 4
    path = shard_path(tmp_path, "train", 0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS_DIR)])}
    script = KILL_SCRIPT.format(tests=str(TESTS_DIR), path=str(path), n=n, pause=pause)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    for line in child.stdout:
        if int(line) >= kill_after:
            break
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    with ShardReader(path) as reader:
        count, keys = len(reader), reader.keys()
        stats_count = reader.header["stats"]["potential"]["count"]
    assert count == len(keys) and kill_after < count < n  # 0..31 were committed
    assert count % 4 == 0  # whole transactions only
    assert keys == [sample_key(i) for i in range(count)]
    assert stats_count == count * 64  # statistics committed with the records

    written = skipped = 0
    with ShardWriter(path, FIELDS, PARAM_NAMES, META, txn_samples=4) as writer:
        assert writer.done == set(range(count))
        for i in range(n):
            if writer.has(i):
                skipped += 1
                continue
            written += writer.write(i, *make_sample(i))
    assert (skipped, written) == (count, n - count)

    reference = write_shard(shard_path(tmp_path, "val", 0), range(n), txn_samples=4)
    with ShardReader(path) as resumed, ShardReader(reference) as clean:
        assert len(resumed) == len(resumed.keys()) == n
        assert resumed.keys() == clean.keys()
        for key in clean.keys():
            assert resumed.read_raw(key) == clean.read_raw(key)
        for name in (*FIELDS, "params"):
            a, b = resumed.header["stats"][name], clean.header["stats"][name]
            assert a["count"] == b["count"]
            np.testing.assert_allclose([a["mean"], a["std"]], [b["mean"], b["std"]], rtol=1e-12)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda s, p: s.update(potential=np.zeros((1, 8, 9), "<f4")), "'potential'"),
        (lambda s, p: s.update(stem=s["stem"].astype(np.float64)), "'stem' is <f8"),
        (lambda s, p: s.pop("stem"), "missing ['stem']"),
        (lambda s, p: s.update(haadf=np.zeros((8, 8), "<f4")), "unexpected ['haadf']"),
        (lambda s, p: p.append(1.0), "params has 4 values"),
    ],
)
def test_sample_not_matching_the_header_is_refused(tmp_path, change, fragment):
    path = shard_path(tmp_path, "train", 0)
    with ShardWriter(path, FIELDS, PARAM_NAMES, META) as writer:
        writer.write(0, *make_sample(0))
        sample, params = make_sample(1)
        params = list(params)
        change(sample, params)
        with pytest.raises(ShardError) as excinfo:
            writer.write(1, sample, params)
        message = one_line_error(excinfo)
        assert fragment in message and f"{path}:0000000001" in message
        assert not writer.has(1)
    with ShardReader(path) as reader:
        assert len(reader) == 1 and reader.keys() == [sample_key(0)]


def test_shard_of_another_dataset_is_refused_unless_overwritten(tmp_path):
    path = write_shard(shard_path(tmp_path, "train", 0), range(5))
    other = {**META, "config_digest": "fff000"}
    with pytest.raises(ShardError, match="config digest 'abc123'") as excinfo:
        ShardWriter(path, FIELDS, PARAM_NAMES, other)
    assert str(path) in one_line_error(excinfo)
    with pytest.raises(ShardError, match="fields"):
        ShardWriter(path, {"potential": FIELDS["potential"]}, PARAM_NAMES, META)
    with ShardWriter(path, FIELDS, PARAM_NAMES, META) as writer:  # same dataset: resumes
        assert writer.done == set(range(5))
        assert writer.write(2, *make_sample(2)) is False
    with ShardWriter(path, FIELDS, PARAM_NAMES, other, overwrite=True) as writer:
        assert writer.done == set() and len(writer) == 0
        writer.write(9, *make_sample(9))
    with ShardReader(path) as reader:
        assert reader.keys() == [sample_key(9)] and reader.header["meta"]["config_digest"] == "fff000"


def test_second_writer_on_one_shard_is_refused(tmp_path):
    path = shard_path(tmp_path, "train", 0)
    with ShardWriter(path, FIELDS, PARAM_NAMES, META):
        with pytest.raises(ShardError, match="another writer"):
            ShardWriter(path, FIELDS, PARAM_NAMES, META)


def test_disk_full_reports_what_is_committed(tmp_path, monkeypatch):
    path = shard_path(tmp_path, "train", 0)
    writer = ShardWriter(path, FIELDS, PARAM_NAMES, META, txn_samples=4)
    for i in range(8):
        writer.write(i, *make_sample(i))

    def no_space(items, header):
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(writer, "_put_batch", no_space)
    with pytest.raises(ShardError, match="disk full") as excinfo:
        for i in range(8, 12):
            writer.write(i, *make_sample(i))
    message = one_line_error(excinfo)
    assert str(path) in message and "8 samples are committed and readable" in message
    writer.close()
    with ShardReader(path) as reader:
        assert len(reader) == 8 and reader.keys() == [sample_key(i) for i in range(8)]


# ----------------------------------------------------------------------------- statistics
def _numpy_stats(arrays):
    """Overall and per-channel (first axis) figures of a stack of samples."""
    stack = np.stack(arrays).astype(np.float64)
    per_channel = np.moveaxis(stack, 1, 0).reshape(stack.shape[1], -1)
    overall = [stack.mean(), stack.std(), stack.min(), stack.max()]
    channels = [per_channel.mean(1), per_channel.std(1), per_channel.min(1), per_channel.max(1)]
    return overall, channels


def _assert_stats_equal(stats, arrays, rtol=1e-10):
    overall, channels = _numpy_stats(arrays)
    got = [stats["mean"], stats["std"], stats["min"], stats["max"]]
    np.testing.assert_allclose(got, overall, rtol=rtol, atol=0)
    ch = stats["channels"]
    for got_c, want_c in zip([ch["mean"], ch["std"], ch["min"], ch["max"]], channels):
        np.testing.assert_allclose(got_c, want_c, rtol=rtol, atol=0)
    assert stats["count"] == np.stack(arrays).size


def test_running_stats_merge_matches_numpy_and_is_stable():
    rng = np.random.default_rng(0)
    # a large offset with a tiny spread: E[x^2] - E[x]^2 would lose every digit here (the
    # inputs themselves only carry ~1e-10 absolute, hence the std tolerance of 1e-7)
    arrays = [1e6 + rng.normal(scale=1e-3, size=(3, 5)) * [[1], [2], [3]] for _ in range(30)]
    parts = [RunningStats(3) for _ in range(3)]
    for i, array in enumerate(arrays):
        parts[i % 3].update(array)
    merged = parts[2].merge(parts[0]).merge(parts[1])
    _assert_stats_equal(merged.to_dict(), arrays, rtol=1e-7)
    restored = RunningStats.from_dict(json.loads(json.dumps(merged.to_dict())))
    _assert_stats_equal(restored.merge(RunningStats(3)).to_dict(), arrays, rtol=1e-7)
    exact = [rng.normal(size=(2, 4, 4)) for _ in range(9)]
    singles = [RunningStats(2).update(a) for a in exact]
    _assert_stats_equal(RunningStats(2).merge(singles[4]).merge(singles[0]).to_dict(), [exact[4], exact[0]])
    assert parts[0].count.tolist() == [50, 50, 50]  # merge left its inputs alone
    assert singles[4].count.tolist() == [16, 16]


def test_manifest_stats_merge_shards_and_match_numpy(tmp_path):
    layout = {("train", 0): range(0, 7), ("train", 1): range(7, 12), ("val", 0): range(12, 15)}
    for (split, k), indices in layout.items():
        write_shard(shard_path(tmp_path, split, k), indices, offset=500.0, txn_samples=3)
    manifest = finalize_manifest(tmp_path)
    train = [make_sample(i, 500.0) for i in range(12)]
    val = [make_sample(i, 500.0) for i in range(12, 15)]
    assert manifest["stats_from"] == ["train"]
    for name in FIELDS:
        _assert_stats_equal(manifest["stats"][name], [s[name] for s, _ in train])
        _assert_stats_equal(manifest["splits"]["val"]["stats"][name], [s[name] for s, _ in val])
    _assert_stats_equal(manifest["stats"]["params"], [p for _, p in train])


# ----------------------------------------------------------------------------- manifest
def _small_dataset(root):
    layout = {("train", 0): range(0, 7), ("train", 1): range(7, 12), ("val", 0): range(12, 15),
              ("test", 0): range(15, 17)}
    for (split, k), indices in layout.items():
        write_shard(shard_path(root, split, k), indices, txn_samples=4)
    return root


def test_manifest_built_from_headers(tmp_path):
    extra = {"simulation": {"num_samples": 17, "mode": "cbed"}}
    manifest = finalize_manifest(_small_dataset(tmp_path), extra=extra)
    splits = manifest["splits"]
    assert splits["train"]["shards"] == [{"path": "train/shard-00000.lmdb", "count": 7},
                                         {"path": "train/shard-00001.lmdb", "count": 5}]
    assert [splits[s]["count"] for s in ("train", "val", "test")] == [12, 3, 2]
    assert manifest["total"] == 17
    assert [(f["name"], f["shape"], f["dtype"]) for f in manifest["fields"]] == [
        (n, list(s.shape), s.dtype) for n, s in FIELDS.items()]
    assert manifest["param_names"] == PARAM_NAMES
    assert (manifest["config_digest"], manifest["seed"], manifest["generator"]) == ("abc123", 7, "test")
    assert manifest["extra"] == extra
    assert read_manifest(tmp_path) == json.loads(json.dumps(manifest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "test", "train", "val"]
    assert verify_dataset(tmp_path) == []


def test_missing_manifest_is_reported(tmp_path):
    with pytest.raises(ShardError, match="no manifest") as excinfo:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in one_line_error(excinfo)
    faults = verify_dataset(tmp_path)
    assert len(faults) == 1 and "manifest.json" in faults[0]


def test_shards_of_different_datasets_are_not_merged(tmp_path):
    write_shard(shard_path(tmp_path, "train", 0), range(3))
    write_shard(shard_path(tmp_path, "train", 1), range(3, 6), meta={**META, "config_digest": "zzz"})
    with pytest.raises(ShardError, match="config_digest='zzz'") as excinfo:
        finalize_manifest(tmp_path)
    assert "shard-00001.lmdb" in one_line_error(excinfo)
    assert not (tmp_path / "manifest.json").exists()


def test_headers_disagreeing_with_the_manifest_are_detected(tmp_path):
    _small_dataset(tmp_path)
    manifest = finalize_manifest(tmp_path)
    assert verify_dataset(tmp_path) == []

    grown = shard_path(tmp_path, "train", 1)  # a writer carried on after finalize
    write_shard(grown, [30, 31], txn_samples=4)

    def retype(raw):
        header = json.loads(raw)
        header["fields"][1]["dtype"] = "<f8"
        header["fields"][1]["shape"] = [1, 4, 8]  # same byte count: records still decode
        return json.dumps(header).encode()

    retyped = shard_path(tmp_path, "val", 0)
    poke(retyped, HEADER_KEY, retype)
    write_shard(shard_path(tmp_path, "test", 1), range(20, 22))  # not in the manifest

    faults = verify_dataset(tmp_path)
    assert len(faults) == 3, faults
    assert str(grown) in faults[0] and "count 7; the manifest expects 5" in faults[0]
    assert str(retyped) in faults[1] and "'potential' is <f8 [1, 4, 8]" in faults[1]
    assert "shard-00001.lmdb" in faults[2] and "not listed in the manifest" in faults[2]
    with pytest.raises(ShardError, match="manifest expects <f4 \\[1, 8, 8\\]"):
        ShardReader(retyped, manifest=manifest)
    with ShardReader(shard_path(tmp_path, "train", 0), manifest=manifest) as reader:
        assert len(reader) == 7


def test_isal_crc32_is_zlibs():
    """The record checksum goes through ISA-L (isal) with zlib's values: the format is
    unchanged, including a running CRC over several parts."""
    from stemnet.shards import CRC32_BACKEND, crc32

    assert CRC32_BACKEND == "isal"
    data = np.random.default_rng(0).bytes(1 << 20)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])
    assert crc32(data[1000:], crc32(data[:1000])) == zlib.crc32(data)
