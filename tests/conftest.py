"""Shared fixtures: the tiny simulated dataset, generated once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TINY_SIMULATION = REPO / "configs/simulation/tiny.yaml"
TINY_TRAINING = REPO / "configs/training/tiny.yaml"


@pytest.fixture(scope="session")
def tiny_config():
    from stemnet.config import load_config

    return load_config(TINY_SIMULATION, require=("simulation",)).simulation


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_config):
    """A real abTEM-simulated dataset (configs/simulation/tiny.yaml), read-only for tests."""
    from simulation.generator import generate

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(tiny_config, out, progress=False)
    return out
