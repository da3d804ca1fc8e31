"""Truncated or damaged shards: a one-line error naming the shard, never a fault.

LMDB memory-maps a shard and trusts it: before the size check, a shard truncated to half
its size killed ``stemnet inspect --verify`` and the training pipeline with SIGBUS (exit
135, no message). Each reader runs in a subprocess, since a SIGBUS would kill pytest.
"""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stemnet.shards import FieldSpec, ShardError, ShardReader, ShardWriter, finalize_manifest, shard_path

META = {"generator": "test", "generator_version": "1", "config_digest": "d1", "seed": 1}
FIELDS = {"stem": FieldSpec((4, 64, 64), "<f4"), "potential": FieldSpec((1, 64, 64), "<f4")}
SAMPLES = 24  # 80 KB records: a shard of ~2 MB, mostly LMDB overflow pages


def build(root):
    rng = np.random.default_rng(0)
    with ShardWriter(shard_path(root, "train", 0), FIELDS, ["a_ang"], META, map_size=1 << 22) as writer:
        for i in range(SAMPLES):
            writer.write(i, {n: rng.random(s.shape, dtype=np.float32) for n, s in FIELDS.items()}, [3.9])
    finalize_manifest(root)
    return shard_path(root, "train", 0)


def damage(path, how):
    size = path.stat().st_size
    if how == "half":
        os.truncate(path, size // 2)
    elif how == "one_page":
        os.truncate(path, 4096)
    elif how == "tiny":
        os.truncate(path, 100)
    elif how == "garbage":  # random bytes over the middle third (record pages)
        with open(path, "r+b") as handle:
            handle.seek(size // 3)
            handle.write(np.random.default_rng(1).bytes(size // 3))
    else:
        raise ValueError(how)


def run(args, **kw):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


READ_PIPELINE = textwrap.dedent("""
    import sys
    from stemnet.data import make_dataset, one_line_errors
    from stemnet.errors import UserError
    try:
        with one_line_errors():
            for _ in make_dataset(sys.argv[1], batch_size=4, targets=["potential"]):
                pass
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("read everything")
""")


def assert_not_killed(proc):
    assert proc.returncode >= 0 and proc.returncode != 128 + signal.SIGBUS, (
        f"killed by signal (returncode {proc.returncode}): {proc.stderr[-500:]}")


@pytest.mark.parametrize("how", ["half", "one_page", "tiny"])
def test_truncated_shard_is_refused_with_one_line_naming_it(tmp_path, how):
    shard = build(tmp_path / "data")
    damage(shard, how)
    inspect = run(["-m", "stemnet.cli", "inspect", str(tmp_path / "data"), "--verify"])
    assert_not_killed(inspect)
    assert inspect.returncode == 2
    last = inspect.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(shard) in last and "cannot open as an LMDB shard" in last
    if how != "tiny":
        assert "truncated" in last
    pipeline = run(["-c", READ_PIPELINE, str(tmp_path / "data")])
    assert_not_killed(pipeline)
    assert pipeline.returncode == 2, pipeline.stderr[-500:]
    error = pipeline.stderr.strip().splitlines()[-1]
    assert str(shard) in error and "cannot open as an LMDB shard" in error
    with pytest.raises(ShardError, match="cannot open as an LMDB shard"):
        ShardReader(shard)


def test_garbage_inside_a_shard_is_reported_not_fatal(tmp_path):
    shard = build(tmp_path / "data")
    damage(shard, "garbage")
    inspect = run(["-m", "stemnet.cli", "inspect", str(tmp_path / "data"), "--verify"])
    assert_not_killed(inspect)
    assert inspect.returncode == 2
    faults = [line for line in inspect.stderr.splitlines() if line.startswith("fault: ")]
    assert faults and all(str(shard) in f for f in faults)
    assert any("CRC mismatch" in f or "damaged" in f for f in faults)
    pipeline = run(["-c", READ_PIPELINE, str(tmp_path / "data")])
    assert_not_killed(pipeline)
    assert pipeline.returncode == 2 and str(shard) in pipeline.stderr.strip().splitlines()[-1]


def test_intact_shard_still_reads(tmp_path):
    """The size check refuses only short files: an intact shard (also one grown by
    appending after a resume) passes."""
    shard = build(tmp_path / "data")
    with ShardWriter(shard, FIELDS, ["a_ang"], META) as writer:  # resume, append one
        writer.write(SAMPLES, {n: np.zeros(s.shape, np.float32) for n, s in FIELDS.items()}, [3.9])
    finalize_manifest(tmp_path / "data")
    pipeline = run(["-c", READ_PIPELINE, str(tmp_path / "data")])
    assert pipeline.returncode == 0 and "read everything" in pipeline.stdout, pipeline.stderr[-500:]
    with ShardReader(shard) as reader:
        assert len(reader) == SAMPLES + 1
