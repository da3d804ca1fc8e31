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


def assert_same_training(one, two, stdout: str, strategies) -> None:
    """The per-strategy .npz files of tests/scripts/one_step.py from 1 process (``one``) and
    2 ranks/workers (``two``) agree: grouping as planned, every step's loss, every final
    variable, and the weights really moved from their (equal) initial values."""
    import numpy as np

    groups = dict(line.split()[1:3] for line in stdout.splitlines() if "STEP " in line)
    assert int(groups["graph"].split("=")[1]) > 1 and int(groups["layer"].split("=")[1]) > 3
    for strategy in strategies:
        name = strategy.replace(":", "_") + ".npz"
        a, b = np.load(one / name), np.load(two / name)
        finals = [k for k in a.files if k.startswith("final_")]
        assert sorted(a.files) == sorted(b.files) and len(finals) > 10
        # the loss of every step, 2 ranks (the global batch's mean) vs 1 process
        np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5, err_msg=strategy)
        assert len(set(np.round(a["losses"], 6))) == 2  # two different batches, two losses
        moved = 0.0
        for key in finals:
            ref, got, init = a[key], b[key], a["init_" + key[6:]]
            np.testing.assert_array_equal(b["init_" + key[6:]], init)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                       err_msg=f"{strategy}: variable {key}")
            moved = max(moved, float(np.abs(ref - init).max() / (np.abs(init).max() + 1e-12)))
        assert moved > 1e-3, strategy  # the steps really changed the weights (the same on both sides)


@pytest.fixture(autouse=True)
def _release_shards():
    """Close the data pipeline's cached shard handles after each test (py-lmdb allows
    one handle per file and process; the next test may reopen or rewrite the shards)."""
    yield
    from stemnet.data import close_shards

    close_shards()


@pytest.fixture(scope="session")
def tiny_config():
    from simulation.config import load_simulation

    return load_simulation(TINY_SIMULATION)


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
