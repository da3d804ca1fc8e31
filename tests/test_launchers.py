"""TF_CONFIG from Slurm and LSF variables, the backend choice, and `stemnet launch` itself.

Slurm and LSF variables are written by hand here (the real-Slurm tests live with the job
scripts); the values follow the launchers' documented formats. `stemnet launch` is run
for real, on small Python workers that need no TensorFlow.
"""

import json
import subprocess
import sys

import pytest

from stemnet.distributed.backends import resolve_backend
from stemnet.distributed.launch import worker_configs
from stemnet.distributed.tfconfig import (
    expand_hostlist,
    expand_tasks_per_node,
    lsf_tf_config,
    slurm_tf_config,
    tf_config_from_environment,
)
from stemnet.errors import UserError

STEMNET = [sys.executable, "-m", "stemnet.cli"]


def test_slurm_hostlists_and_task_counts_expand():
    assert expand_hostlist("frontier[00098-00100,00200],login1") == [
        "frontier00098", "frontier00099", "frontier00100", "frontier00200", "login1"]
    assert expand_hostlist("nid[9-10]-hsn") == ["nid9-hsn", "nid10-hsn"]
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    with pytest.raises(UserError, match="SLURM_STEP_TASKS_PER_NODE"):
        expand_tasks_per_node("8(2)")


def _slurm(rank, node, local, **extra):
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "5", "SLURM_STEP_NODELIST": "nid[001-002]",
           "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_NODEID": str(node), "SLURM_LOCALID": str(local)}
    return {**env, **extra}


def test_slurm_tf_config_puts_each_rank_on_its_node_and_port():
    config = slurm_tf_config(_slurm(4, 1, 1), port_base=9000)
    assert config == {"cluster": {"worker": ["nid001:9000", "nid001:9001", "nid001:9002",
                                             "nid002:9000", "nid002:9001"]},
                      "task": {"type": "worker", "index": 4}}
    assert tf_config_from_environment(_slurm(0, 0, 0, STEMNET_MWMS_PORT_BASE="7000"))["cluster"]["worker"][0] \
        == "nid001:7000"


def test_slurm_cyclic_distribution_and_bad_counts_are_refused():
    with pytest.raises(UserError, match="block task distribution"):
        slurm_tf_config(_slurm(1, 1, 0))  # cyclic: rank 1 on the second node
    with pytest.raises(UserError, match="adding up to SLURM_NTASKS=5"):
        slurm_tf_config(_slurm(0, 0, 0, SLURM_STEP_TASKS_PER_NODE="2,2"))


def test_lsf_tf_config_leaves_out_the_launch_node():
    env = {"JSM_NAMESPACE_RANK": "7", "JSM_NAMESPACE_SIZE": "12", "JSM_NAMESPACE_LOCAL_RANK": "1",
           "LSB_MCPU_HOSTS": "batch3 1 a01n01 42 a01n02 42"}
    config = lsf_tf_config(env, port_base=9000)
    workers = config["cluster"]["worker"]
    assert len(workers) == 12 and workers[0] == "a01n01:9000" and workers[7] == "a01n02:9001"
    assert config["task"]["index"] == 7 and not any(w.startswith("batch3") for w in workers)
    with pytest.raises(UserError, match="LSB_MCPU_HOSTS"):
        lsf_tf_config({**env, "JSM_NAMESPACE_SIZE": "13"})


def test_no_launcher_gives_no_tf_config():
    assert tf_config_from_environment({}) is None
    assert tf_config_from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None


def test_auto_backend_follows_tf_config(monkeypatch):
    import importlib.util

    has_horovod = importlib.util.find_spec("horovod") is not None
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert resolve_backend("auto") == ("horovod" if has_horovod else "mwms")
    monkeypatch.setenv("TF_CONFIG", json.dumps(worker_configs(2)[0]))
    assert resolve_backend("auto") == "mwms"
    assert resolve_backend("mwms") == "mwms"
    if not has_horovod:
        with pytest.raises(UserError, match="horovod is not installed"):
            resolve_backend("horovod")


def test_worker_configs_share_one_cluster_on_distinct_ports():
    configs = worker_configs(3)
    clusters = {json.dumps(c["cluster"]) for c in configs}
    assert len(clusters) == 1 and [c["task"]["index"] for c in configs] == [0, 1, 2]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)


WORKER = (
    "import json, os, sys, time\n"
    "task = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
    "n = len(json.loads(os.environ['TF_CONFIG'])['cluster']['worker'])\n"
    "os.write(1, f'worker {task} {n}\\n'.encode())  # one write: lines of concurrent workers cannot interleave\n"
    "if task == int(sys.argv[1]): sys.exit(3)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def test_launch_runs_every_worker_and_succeeds():
    proc = subprocess.run(STEMNET + ["launch", "-n", "3", "--", sys.executable, "-c", WORKER, "-1", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:3]) == ["worker 0 3", "worker 1 3", "worker 2 3"]


def test_launch_stops_the_others_when_one_fails():
    """Worker 1 exits 3 at once; the others would sleep 600 s: launch stops them and exits 3
    (within the subprocess timeout, far below the 600 s they would sleep)."""
    proc = subprocess.run(STEMNET + ["launch", "-n", "3", "--grace", "2", "--", sys.executable, "-c", WORKER,
                                     "1", "600"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "worker 1 exited with code 3: stopping the other 2 worker(s)" in proc.stderr


def test_rank_info_reads_tf_config_when_no_launcher_variable_is_set():
    from stemnet.ranks import launcher_rank

    config = json.dumps(worker_configs(3)[2])
    assert tuple(launcher_rank({"TF_CONFIG": config})) == (2, 3, "TF_CONFIG")
    assert launcher_rank({"TF_CONFIG": config, "SLURM_PROCID": "1", "SLURM_NTASKS": "3"}).source == "SLURM_PROCID"
    with pytest.raises(UserError, match="TF_CONFIG"):
        launcher_rank({"TF_CONFIG": "{not json"})
