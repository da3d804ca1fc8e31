"""``stemnet submit`` through a real Slurm: munged, slurmctld and slurmd on localhost.

The cluster (tests/slurm_cluster.py) is Debian's slurm-wlm 22.05 with munge, one node of
2 CPUs, started for this module and stopped daemon by daemon. Jobs are submitted by the
real CLI (``stemnet submit ... --machine localslurm``, the shipped profile) with the real
``sbatch``, waited for with ``squeue`` and judged with ``scontrol show job`` (the test
cluster has no accounting database, so ``sacct`` has nothing to report). The only
reason these tests do not run is that the packages are missing (``make test`` installs
them when it runs as root).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import INSTALL_HINT, LocalSlurm, missing_programs

REPO = Path(__file__).resolve().parents[1]
TINY_SIMULATION = REPO / "configs/simulation/tiny.yaml"
TINY_TRAINING = REPO / "configs/training/tiny.yaml"
MISSING = missing_programs()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING), reason=f"Slurm not installed (no {', '.join(MISSING)}): {INSTALL_HINT}")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values())  # every daemon gone


def stemnet(slurm, *args) -> subprocess.CompletedProcess:
    """The real CLI, with the test cluster's SLURM_CONF (sbatch exports it to the job)."""
    return subprocess.run([sys.executable, "-m", "stemnet.cli", *map(str, args)], env=slurm.env,
                          capture_output=True, text=True, timeout=300)


def job_ids(output: str):
    return re.findall(r"^submitted (\d+) ", output, re.M)


def job_log(folder: Path, job_id: str, stream: str = "err") -> str:
    (path,) = (folder / "jobs").glob(f"*.{job_id}.{stream}")
    return path.read_text()


@pytest.fixture(scope="module")
def slurm_dataset(slurm, tmp_path_factory):
    """configs/simulation/tiny.yaml simulated by a `stemnet submit simulate` Slurm job."""
    out = tmp_path_factory.mktemp("slurm-data") / "data"
    sub = stemnet(slurm, "submit", "simulate", "--machine", "localslurm", "--nodes", 1, "--walltime", "00:20",
                  "--project", "test", "--config", TINY_SIMULATION, "--out", out)
    assert sub.returncode == 0, sub.stderr
    (job,) = job_ids(sub.stdout)
    state = slurm.wait([job])[job]
    return out, job, state


def test_submit_simulate_runs_under_slurm_and_the_dataset_verifies(slurm, slurm_dataset):
    out, job, state = slurm_dataset
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), job_log(out, job)
    assert state["NumCPUs"] == "2" and state["JobName"] == "stemnet-simulate-data"
    check = stemnet(slurm, "inspect", out, "--verify")
    assert check.returncode == 0, check.stderr
    assert (out / "manifest.json").is_file()
    assert "12" in check.stdout  # the 12 samples of tiny.yaml
    assert "srun -N 1 -n 1 --ntasks-per-node=1 -c 2 stemnet simulate" in (out / "jobs").joinpath(
        next(p.name for p in (out / "jobs").glob("simulate-*.sh"))).read_text()


def test_chained_training_resumes_after_usr2_checkpoint(slurm, slurm_dataset, tmp_path):
    """Job 1 of a --chain 2 gets `scancel --signal=USR2`: the training step checkpoints and
    stops; job 2 (after job 1) resumes the same run from that checkpoint and finishes it."""
    data, _, state = slurm_dataset
    assert state["JobState"] == "COMPLETED"
    run = tmp_path / "run"
    steps = 150
    sub = stemnet(slurm, "submit", "train", "--machine", "localslurm", "--nodes", 1, "--walltime", "00:20",
                  "--project", "test", "--config", TINY_TRAINING, "--data", data, "--out", run, "--chain", 2,
                  "-o", f"train.steps={steps}", "-o", "train.checkpoint_every=5", "-o", "train.val_every=1000")
    assert sub.returncode == 0, sub.stderr
    first, second = job_ids(sub.stdout)
    assert slurm.job_state(second)["Dependency"].startswith(f"afterany:{first}")

    # Wait for the first periodic checkpoint: the trainer's signal handler is installed.
    ckpts = run / "checkpoints"
    slurm.wait([first], until=lambda: any(ckpts.glob("ckpt-*.index")))
    assert slurm.job_state(first)["JobState"] == "RUNNING", job_log(run, first)
    slurm.run(["scancel", "--signal=USR2", first])
    states = slurm.wait([first, second])

    log1 = job_log(run, first)
    stopped = re.search(r"signal 12: checkpoint written at step (\d+)", log1)
    assert stopped, log1
    k = int(stopped.group(1))
    assert 0 < k < steps
    assert states[first]["JobState"] == "FAILED" and states[first]["ExitCode"] == "140:0"  # 128 + SIGUSR2
    assert states[second]["JobState"] == "COMPLETED", job_log(run, second)
    log2 = job_log(run, second)
    assert re.search(rf"resumed .*ckpt-{k} at step {k}\b", log2), log2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["finished"]
    assert summary["steps_this_call"] == steps - k  # job 2 did only what job 1 had left
