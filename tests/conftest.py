"""Shared fixtures: the tiny simulated dataset, generated once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TINY_SIMULATION = REPO / "configs/simulation/tiny.yaml"
TINY_TRAINING = REPO / "configs/training/tiny.yaml"


def poke(path, index, transform):
    """Rewrite sample ``index`` of a shard with ``transform(raw record bytes)`` (damage it)."""
    import lmdb

    from stemnet.shards import sample_key

    env = lmdb.open(str(path), subdir=False)
    with env.begin(write=True) as txn:
        key = sample_key(index)
        txn.put(key, transform(bytes(txn.get(key))))
    env.close()


@pytest.fixture(autouse=True)
def _release_shards():
    """Close the data pipeline's cached shard handles after each test (py-lmdb allows
    one handle per file and process; the next test may reopen or rewrite the shards)."""
    yield
    from stemnet.data import close_shards

    close_shards()


@pytest.fixture(scope="session")
def tiny_config():
    from stemnet.config import load_config

    return load_config(TINY_SIMULATION, require=("simulation",)).simulation


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_config):
    """A real abTEM-simulated dataset (configs/simulation/tiny.yaml), read-only for tests."""
    reuse = os.environ.get("STEMNET_TEST_TINY_DATASET")  # tools/mutate.py: made once by the unmutated code
    if reuse:
        return Path(reuse)
    from simulation.generator import generate

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(tiny_config, out, progress=False)
    return out


_DESELECTED = []  # horovod-marked tests left out of this session
HOROVOD_ABSENT = "Horovod is not installed: the modern stack (TensorFlow >= 2.16) has none; its tests run on the pinned stack"


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) the `horovod` tests where Horovod cannot exist, and say so."""
    from stemnet.distributed.backends import horovod_available

    if horovod_available():
        return
    dropped = [item for item in items if item.get_closest_marker("horovod")]
    if dropped:
        items[:] = [item for item in items if not item.get_closest_marker("horovod")]
        config.hook.pytest_deselected(items=dropped)
        _DESELECTED.extend(item.nodeid for item in dropped)


def pytest_report_header(config):
    from stemnet.distributed.backends import horovod_available

    import numpy

    stack = "pinned (Horovod)" if horovod_available() else "modern (no Horovod)"
    return f"stemnet stack: {stack}, numpy {numpy.__version__}"


def pytest_terminal_summary(terminalreporter, config):
    if _DESELECTED:
        terminalreporter.write_line(f"{len(_DESELECTED)} horovod-marked tests deselected: {HOROVOD_ABSENT}")
