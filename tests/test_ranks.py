"""Rank/world detection from each launcher's environment, and rank-aware logging."""

import io
import logging

import pytest

from stemnet.log import setup_logging
from stemnet.ranks import LAUNCHER_VARIABLES, launcher_rank


@pytest.mark.parametrize("rank_var,size_var", LAUNCHER_VARIABLES)
def test_each_launcher(rank_var, size_var):
    info = launcher_rank({rank_var: "3", size_var: "8"})
    assert (info.rank, info.world, info.source) == (3, 8, rank_var)


def test_default_is_single_process():
    info = launcher_rank({})
    assert (info.rank, info.world, info.source) == (0, 1, "default")


def test_named_launchers_are_covered():
    names = {rank for rank, _ in LAUNCHER_VARIABLES}
    assert {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "JSM_NAMESPACE_RANK", "SLURM_PROCID"} <= names
    sizes = dict(LAUNCHER_VARIABLES)
    assert sizes["SLURM_PROCID"] == "SLURM_NTASKS"
    assert sizes["JSM_NAMESPACE_RANK"] == "JSM_NAMESPACE_SIZE"


def test_first_launcher_wins():
    info = launcher_rank({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                          "SLURM_PROCID": "5", "SLURM_NTASKS": "6"})
    assert (info.rank, info.world) == (1, 2)


@pytest.mark.parametrize("env,message", [
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x': expected an integer rank"),
    ({"PMIX_RANK": "1"}, "PMIX_RANK is set but PMIX_SIZE is not"),
    ({"JSM_NAMESPACE_RANK": "4", "JSM_NAMESPACE_SIZE": "4"}, "expected 0 <= rank < size"),
])
def test_bad_launcher_environment(env, message):
    with pytest.raises(ValueError, match=message):
        launcher_rank(env)


def _log_lines(monkeypatch, env):
    for rank_var, size_var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(rank_var, raising=False)
        monkeypatch.delenv(size_var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stream = io.StringIO()
    # the launcher's view (Horovod may be initialised in this test process by other tests)
    logger = setup_logging(stream=stream, info=launcher_rank())
    logger.info("hello")
    logger.warning("careful")
    return stream.getvalue().splitlines()


def test_single_process_logging_has_no_prefix(monkeypatch):
    assert _log_lines(monkeypatch, {}) == ["INFO hello", "WARNING careful"]


def test_rank0_logs_info_with_prefix(monkeypatch):
    lines = _log_lines(monkeypatch, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert lines == ["[0/4] INFO hello", "[0/4] WARNING careful"]


def test_other_ranks_log_warnings_only(monkeypatch):
    lines = _log_lines(monkeypatch, {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"})
    assert lines == ["[2/4] WARNING careful"]
    assert logging.getLogger("stemnet").level == logging.WARNING
