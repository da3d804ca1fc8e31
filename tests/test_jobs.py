"""Batch jobs (``stemnet submit``): profiles, rendered scripts, submission, bad input.

LSF cannot run here (it has no free equivalent), and Summit/Frontier-shaped Slurm jobs
need their nodes, so ``bsub``, ``sbatch``, ``jsrun``, ``srun``, ``horovodrun`` and
``module`` are stand-ins: small shell scripts written into ``tmp_path`` and put first on
PATH. The submit stand-ins record their arguments and standard input and answer as LSF /
Slurm do (``Job <12345> is submitted to queue <batch>.`` / ``Submitted batch job 12345``,
the id counting up per call). The launcher stand-ins start every rank locally with the
launcher's rank variables set, and the ``stemnet`` lines of the rendered scripts run the
real CLI on tiny data inside them. A real Slurm cluster runs in test_slurm.py.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from stemnet.cli.jobs import submit_command
from stemnet.hpc import machines, render
from stemnet.hpc import submit as jobs
from stemnet.ranks import RANK_VARIABLES
from stemnet.config import load_config
from stemnet.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "configs/training/tiny.yaml"
SIMULATION = REPO / "configs/simulation/tiny.yaml"


# ------------------------------------------------------------------------------ helpers
def write_exe(path: Path, text: str) -> Path:
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)
    return path


@pytest.fixture
def dataset(tmp_path):
    """A folder that passes submit's check (a manifest); its contents are never read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    return data


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """bsub and sbatch stand-ins first on PATH; they log to tmp_path/bin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "bsub", """
dir=$(dirname "$0"); n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$dir/count"
for a in "$@"; do echo "$a"; done > "$dir/submit-$n.args"
cat > "$dir/submit-$n.stdin"
if [ -n "$FAKE_REFUSE" ]; then echo "$FAKE_REFUSE" >&2; exit 255; fi
echo "Job <$((12344 + n))> is submitted to queue <batch>."
""")
    write_exe(bin_dir / "sbatch", """
dir=$(dirname "$0"); n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$dir/count"
for a in "$@"; do echo "$a"; done > "$dir/submit-$n.args"
if [ -n "$FAKE_REFUSE" ]; then echo "sbatch: error: $FAKE_REFUSE" >&2; exit 1; fi
echo "Submitted batch job $((12344 + n))"
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FAKE_REFUSE", raising=False)
    return bin_dir


def train_job(dataset, out, **kw):
    args = dict(machine="summit", nodes=2, walltime="02:00", project="MAT123", config=TRAINING,
                out=out, data=dataset)
    args.update(kw)
    return args


def launcher_options(script: str, launcher: str, marker: str) -> dict:
    """The options of the launcher line that runs ``marker`` (parsed, not pattern-matched)."""
    lines = [line for line in script.splitlines() if line.startswith(launcher + " ") and marker in line]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0].rstrip(" &\\"))
    options, i = {}, 1
    while argv[i].startswith("-"):
        if "=" in argv[i]:
            key, value = argv[i].split("=", 1)
            options[key] = value
            i += 1
        elif argv[i].startswith("--"):
            options[argv[i]] = True
            i += 1
        else:
            options[argv[i]] = argv[i + 1]
            i += 2
    return options


def profile_copy(tmp_path, name, **changes) -> Path:
    """configs/machines/{name}.yaml with ``changes`` to its machine section, in tmp_path."""
    data = yaml.safe_load((machines.MACHINES_DIR / f"{name}.yaml").read_text())
    data["machine"].update(changes)
    path = tmp_path / f"{name}-test.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("name", ["summit", "frontier", "perlmutter", "local", "localslurm"])
def test_profiles_validate(name):
    m = machines.load_machine(name)
    assert m.name == name
    assert m.ranks_per_node * m.cores_per_rank <= m.cores_per_node


def test_profile_facts():
    summit, frontier, perlmutter = (machines.load_machine(n) for n in ("summit", "frontier", "perlmutter"))
    assert (summit.scheduler, summit.launcher, summit.gpus_per_node, summit.cores_per_node) == ("lsf", "jsrun", 6, 42)
    assert (summit.max_nodes, summit.max_walltime, summit.alloc_flags) == (4608, "24:00", "nvme smt4")
    assert summit.walltime_limit(4608) == 24 * 60 and summit.walltime_limit(2) == 120
    assert (frontier.scheduler, frontier.gpus_per_node, frontier.cores_per_node, frontier.staging_path) == (
        "slurm", 8, 56, "/mnt/bb/$USER")
    assert (perlmutter.gpus_per_node, perlmutter.cores_per_node, perlmutter.constraint) == (4, 64, "gpu")


def test_profile_extra_key_is_one_line_error(tmp_path):
    path = profile_copy(tmp_path, "summit", gpus_per_nod=6)
    with pytest.raises(UserError, match=r"summit-test.yaml: machine.gpus_per_nod: unknown key") as err:
        machines.load_machine(path)
    assert "\n" not in str(err.value)


def test_profile_inconsistent_geometry(tmp_path):
    with pytest.raises(UserError, match=r"6 ranks x 8 cores = 48 is more than cores_per_node 42"):
        machines.load_machine(profile_copy(tmp_path, "summit", cores_per_rank=8))
    with pytest.raises(UserError, match=r"launcher: 'srun' does not go with scheduler 'lsf'"):
        machines.load_machine(profile_copy(tmp_path, "summit", launcher="srun"))


# ---------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("machine,task", [(m, t) for m in ("summit", "frontier", "perlmutter", "local")
                                          for t in ("simulate", "train")])
def test_rendered_scripts_pass_bash_n(tmp_path, dataset, machine, task):
    kw = dict(machine=machine, nodes=1, walltime="01:00", project="ABC123", config=TRAINING,
              out=tmp_path / "out", data=dataset, dry_run=True)
    if task == "simulate":
        kw.update(config=SIMULATION, data=None)
    sub = jobs.submit(task, **kw)
    assert sub.script.parent == tmp_path / "out" / "jobs" and sub.script.read_text() == sub.text
    check = subprocess.run(["bash", "-n", str(sub.script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "{{" not in sub.text


@pytest.mark.parametrize("nodes", [1, 2, 4600])
def test_summit_jsrun_geometry(tmp_path, dataset, nodes):
    walltime = "02:00" if nodes < 46 else "24:00"
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run", nodes=nodes, walltime=walltime), dry_run=True)
    for marker in ("stemnet train", "stemnet stage"):
        opts = launcher_options(sub.text, "jsrun", marker)
        assert opts == {"-n": str(6 * nodes), "-a": "1", "-c": "7", "-g": "1", "-r": "6", "-b": "packed:7"}
    copy_back = launcher_options(sub.text, "jsrun", "node-out")
    assert copy_back["-n"] == str(nodes) and copy_back["-r"] == "1"
    assert f"#BSUB -nnodes {nodes}\n" in sub.text
    for line in ("#BSUB -P MAT123", f"#BSUB -W {walltime}", '#BSUB -alloc_flags "nvme smt4"',
                 "#BSUB -wa USR2", "#BSUB -wt 10", "#BSUB -J stemnet-train-run",
                 f"#BSUB -o {tmp_path}/run/jobs/train.%J.out", f"#BSUB -e {tmp_path}/run/jobs/train.%J.err"):
        assert line + "\n" in sub.text
    if nodes == 4600:
        assert "4600 node(s) x 6 ranks = 27600 ranks" in sub.text


@pytest.mark.parametrize("machine,nodes,expected", [
    ("frontier", 1, {"-N": "1", "-n": "8", "--ntasks-per-node": "8", "-c": "7", "--gpus-per-task": "1",
                     "--gpu-bind": "closest"}),
    ("frontier", 2, {"-N": "2", "-n": "16", "--ntasks-per-node": "8", "-c": "7", "--gpus-per-task": "1",
                     "--gpu-bind": "closest"}),
    ("frontier", 4600, {"-N": "4600", "-n": "36800", "--ntasks-per-node": "8", "-c": "7", "--gpus-per-task": "1",
                        "--gpu-bind": "closest"}),
    ("perlmutter", 2, {"-N": "2", "-n": "8", "--ntasks-per-node": "4", "-c": "32", "--gpus-per-task": "1",
                       "--cpu-bind": "cores"}),
])
def test_slurm_srun_geometry(tmp_path, dataset, machine, nodes, expected):
    walltime = "02:00" if nodes < 92 else "12:00"
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run", machine=machine, nodes=nodes,
                                           walltime=walltime), dry_run=True)
    assert launcher_options(sub.text, "srun", "stemnet train") == expected
    assert f"#SBATCH -N {nodes}\n" in sub.text and f"#SBATCH -t {walltime}:00\n" in sub.text
    assert "#SBATCH -A MAT123\n" in sub.text and "#SBATCH --signal=USR2@600\n" in sub.text
    per_node, cpus = expected["--ntasks-per-node"], expected["-c"]  # the allocation holds the srun geometry
    assert f"#SBATCH --ntasks-per-node={per_node}\n" in sub.text and f"#SBATCH --cpus-per-task={cpus}\n" in sub.text
    if machine == "frontier":
        assert "#SBATCH -C nvme\n" in sub.text and "stemnet stage" in sub.text
    else:
        assert "#SBATCH -C gpu\n" in sub.text and "stemnet stage" not in sub.text
        assert '--data "$STEMNET_DATA"' in sub.text  # no node-local disk: read in place


def test_horovod_settings_from_config(tmp_path, dataset):
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run"), overrides=["distributed.cache_capacity=4096"],
                      dry_run=True)
    assert "export HOROVOD_CACHE_CAPACITY=4096\n" in sub.text
    assert "export HOROVOD_FUSION_THRESHOLD=67108864\n" in sub.text  # the default 64 MiB
    frozen = load_config(sub.script.with_suffix(".yaml"), require=("model", "train"))
    assert frozen == load_config(TRAINING, ["distributed.cache_capacity=4096"])

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(REPO / "configs/model/tiny.yaml"),
        "train": {"steps": 5},
        "distributed": {"cycle_time_ms": 3.5, "fusion_threshold_mib": 32, "cache_capacity": 0,
                        "timeline": "timeline.json"},
    }))
    text = jobs.submit("train", **train_job(dataset, tmp_path / "run2", config=config), dry_run=True).text
    for line in ("HOROVOD_CACHE_CAPACITY=0", "HOROVOD_CYCLE_TIME=3.5", "HOROVOD_FUSION_THRESHOLD=33554432",
                 "HOROVOD_TIMELINE=timeline.json", "HOROVOD_TIMELINE_MARK_CYCLES=1"):
        assert f"export {line}\n" in text


def test_simulation_script_has_no_signal_or_horovod(tmp_path):
    text = jobs.submit("simulate", machine="summit", nodes=2, walltime="01:00", project="MAT123",
                       config=SIMULATION, out=tmp_path / "ds", dry_run=True).text
    assert "-wa USR2" not in text and "HOROVOD_" not in text  # SIGUSR2 would kill a simulation
    opts = launcher_options(text, "jsrun", "stemnet simulate")
    assert opts["-n"] == "12" and opts["-c"] == "7"
    assert 'stemnet simulate --finalize "$STEMNET_DATA"' in text


# ---------------------------------------------------------------------------- submission
def test_bsub_receives_script_and_id_is_parsed(tmp_path, dataset, fake_bin):
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run"))
    assert sub.job_ids == ["12345"]
    assert (fake_bin / "submit-1.stdin").read_text() == sub.script.read_text()
    assert (fake_bin / "submit-1.args").read_text() == ""  # `bsub < script`: directives come from it


def test_chain_of_three_depends_on_previous(tmp_path, dataset, fake_bin):
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run"), chain=3)
    assert sub.job_ids == ["12345", "12346", "12347"]
    args = [(fake_bin / f"submit-{i}.args").read_text().split("\n")[:-1] for i in (1, 2, 3)]
    assert args == [[], ["-w", "ended(12345)"], ["-w", "ended(12346)"]]
    assert len(list((tmp_path / "run" / "jobs").glob("*.sh"))) == 1  # one script, three jobs


def test_sbatch_chain(tmp_path, dataset, fake_bin):
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run", machine="frontier"), chain=3)
    assert sub.job_ids == ["12345", "12346", "12347"]
    args = [(fake_bin / f"submit-{i}.args").read_text().split("\n")[:-1] for i in (1, 2, 3)]
    assert args == [[str(sub.script)], ["--dependency=afterany:12345", str(sub.script)],
                    ["--dependency=afterany:12346", str(sub.script)]]


def test_submit_command_through_click(tmp_path, dataset, fake_bin):
    @click.group()
    def cli():
        pass

    cli.add_command(submit_command)
    result = CliRunner().invoke(cli, [
        "submit", "train", "--machine", "summit", "--nodes", "2", "--walltime", "02:00", "--project", "MAT123",
        "--config", str(TRAINING), "--data", str(dataset), "--out", str(tmp_path / "run"), "--chain", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("submitted 12345 (1/2): train on summit, 2 node(s) x 6 ranks, 02:00")
    assert lines[1].startswith("submitted 12346 (2/2, after 12345)")
    assert lines[2].startswith(f"script: {tmp_path}/run/jobs/train-")

    dry = CliRunner().invoke(cli, [
        "submit", "simulate", "--machine", "frontier", "--nodes", "4", "--walltime", "01:30", "--project", "MAT123",
        "--config", str(SIMULATION), "--out", str(tmp_path / "ds"), "--dry-run"])
    assert dry.exit_code == 0 and dry.output.startswith("#!/bin/bash\n# stemnet simulate job for frontier")
    assert not (fake_bin / "submit-3.args").exists()  # nothing submitted


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change,message", [
    ({"machine": "sumit"}, r"machine sumit: unknown machine; expected one of frontier, local, localslurm, perlmutter, summit"),
    ({"nodes": 0}, r"nodes 0: expected a positive number of nodes"),
    ({"nodes": -3}, r"nodes -3: expected a positive number of nodes"),
    ({"nodes": 5000}, r"nodes 5000: summit has at most 4608 node\(s\)"),
    ({"walltime": "2h"}, r"walltime 2h: expected HH:MM"),
    ({"walltime": "01:75"}, r"walltime 01:75: expected HH:MM"),
    ({"walltime": "00:00"}, r"walltime 00:00: expected a walltime longer than 00:00"),
    ({"walltime": None}, r"walltime: required on summit"),
    ({"walltime": "03:00"}, r"walltime 03:00: summit allows at most 02:00 for a job of 2 node\(s\)"),
    ({"walltime": "24:30", "nodes": 4600}, r"summit allows at most 24:00 for a job of 4600 node\(s\)"),
    ({"walltime": "00:10"}, r"more than the 10 minutes reserved for the checkpoint signal"),
    ({"project": None}, r"project: required on summit"),
    ({"project": ""}, r"project: required on summit"),
    ({"overrides": ["train.batch_size=0"]}, r"-o train.batch_size=0: train.batch_size: expected a positive integer"),
    ({"config": SIMULATION}, r"simulation/tiny.yaml: model: missing section"),
    ({"data": None}, r"data: required for `submit train`"),
    ({"chain": 0}, r"chain 0: expected a positive number of jobs"),
])
def test_bad_input_is_refused_before_submission(tmp_path, dataset, fake_bin, change, message):
    args = train_job(dataset, tmp_path / "run")
    args.update(change)
    with pytest.raises(UserError, match=message) as err:
        jobs.submit("train", **args)
    assert "\n" not in str(err.value)
    assert not (fake_bin / "count").exists()  # bsub never called
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_simulation_input(tmp_path, dataset, fake_bin):
    base = dict(machine="summit", nodes=1, walltime="01:00", project="MAT123", out=tmp_path / "ds")
    with pytest.raises(UserError, match=r"training/tiny.yaml: simulation: missing section"):
        jobs.submit("simulate", config=TRAINING, **base)
    with pytest.raises(UserError, match=r"data: only for `submit train`"):
        jobs.submit("simulate", config=SIMULATION, data=dataset, **base)
    with pytest.raises(UserError, match=r"task 'evaluate': expected one of simulate, train"):
        jobs.submit("evaluate", config=SIMULATION, **base)
    assert not (fake_bin / "count").exists()


def test_dataset_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data .*empty: no manifest.json"):
        jobs.submit("train", **train_job(tmp_path / "empty", tmp_path / "run"), dry_run=True)


def test_bsub_missing(tmp_path, dataset, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(UserError, match=r"^bsub: command not found; submit from a summit login node "
                                        r"\(the script is saved: .*/run/jobs/train-.*\.sh\)$"):
        jobs.submit("train", **train_job(dataset, tmp_path / "run"))
    assert len(list((tmp_path / "run" / "jobs").glob("train-*.sh"))) == 1  # saved either way


def test_bsub_refusing_shows_its_message(tmp_path, dataset, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_REFUSE", "MAT999: Not a valid project name. Job not submitted.")
    with pytest.raises(UserError) as err:
        jobs.submit("train", **train_job(dataset, tmp_path / "run"))
    assert str(err.value) == "bsub refused job 1 of 1 (exit 255): MAT999: Not a valid project name. Job not submitted."


def test_chain_refused_midway_names_submitted_jobs(tmp_path, dataset, fake_bin):
    write_exe(fake_bin / "bsub", """
dir=$(dirname "$0"); n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$dir/count"
cat > /dev/null
if [ $n -ge 3 ]; then echo "Too many jobs pending for user. Job not submitted." >&2; exit 255; fi
echo "Job <$((12344 + n))> is submitted to queue <batch>."
""")
    with pytest.raises(UserError, match=r"^bsub refused job 3 of 4 \(exit 255\): Too many jobs pending for user\. "
                                        r"Job not submitted\.; submitted so far: 12345, 12346$"):
        jobs.submit("train", **train_job(dataset, tmp_path / "run"), chain=4)


def test_unparsable_answer(tmp_path, dataset, fake_bin):
    write_exe(fake_bin / "sbatch", "echo 'queued, maybe'\n")
    with pytest.raises(UserError, match=r"^sbatch: no job id in its answer: queued, maybe$"):
        jobs.submit("train", **train_job(dataset, tmp_path / "run", machine="frontier"))


def test_parse_job_id():
    assert jobs.parse_job_id("lsf", "Job <4242> is submitted to queue <batch>.\n") == "4242"
    assert jobs.parse_job_id("slurm", "Submitted batch job 99\n") == "99"
    assert jobs.parse_job_id("slurm", "99;frontier\n") == "99"  # sbatch --parsable
    assert jobs.parse_job_id("lsf", "Request aborted by esub. Job not submitted.") is None


# ------------------------------------------------------- running the scripts (stand-ins)
# The `stemnet` on PATH logs its call and execs the real CLI (this checkout, this Python):
# every rendered `stemnet` line is parsed and run for real, on tiny data, so an option the
# CLI does not know fails the test. Only the launchers are stand-ins (no LSF here; the real
# Slurm runs in test_slurm.py). Training runs one rank: without horovodrun the ranks a
# stand-in launcher starts could not form one Horovod job.
FAKE_STEMNET = """
rank=${JSM_NAMESPACE_RANK:-${SLURM_PROCID:-${HOROVOD_RANK:-}}}
echo "stemnet $* [rank=$rank]" >> "$FAKE_LOG"
if [ "$1" = train ] && [ -n "${STEMNET_LOCAL_OUT:-}" ]; then  # a node-local output for the copy-back step
  mkdir -p "$STEMNET_LOCAL_OUT" && echo "$rank" > "$STEMNET_LOCAL_OUT/rank-$rank.txt"
fi
exec "$STEMNET_PYTHON" -m stemnet.cli "$@"
"""

# jsrun/srun/horovodrun stand-in: every rank runs locally with the launcher's variables set;
# a SIGUSR2 to the launcher is forwarded to the ranks.
FAKE_LAUNCHER = """
echo "$(basename "$0") $*" >> "$FAKE_LOG"
n=1
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  case "$1" in
    -n|-np) n=$2; shift 2 ;;
    -a|-c|-g|-r|-b|-N|-H) shift 2 ;;
    *) shift ;;
  esac
done
pids=""
trap 'echo "launcher: USR2" >> "$FAKE_LOG"; kill -USR2 $pids 2>/dev/null' USR2
for ((r = 0; r < n; r++)); do
  env {rank}=$r {size}=$n "$@" &
  pids="$pids $!"
done
status=0
for p in $pids; do
  while :; do wait "$p"; rc=$?; kill -0 "$p" 2>/dev/null || break; done
  [ "$rc" -ne 0 ] && status=$rc
done
exit $status
"""


@pytest.fixture
def stand_ins(tmp_path):
    bin_dir = tmp_path / "fakes"
    bin_dir.mkdir()
    write_exe(bin_dir / "stemnet", FAKE_STEMNET)
    write_exe(bin_dir / "module", 'echo "module $*" >> "$FAKE_LOG"\n')
    for launcher in ("jsrun", "srun", "mpirun", "horovodrun"):
        rank, size = RANK_VARIABLES[launcher]
        write_exe(bin_dir / launcher, FAKE_LAUNCHER.replace("{rank}", rank).replace("{size}", size))
    log = tmp_path / "fake.log"
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "USER": "tester", "HOME": str(tmp_path),
           "STEMNET_PYTHON": sys.executable, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return env, log


def verify(dataset: Path) -> None:
    from stemnet.shards import verify_dataset

    assert verify_dataset(dataset) == []  # every record's CRC, every header against the manifest


@pytest.mark.slow
def test_lsf_training_script_runs_every_step(tmp_path, tiny_dataset, stand_ins):
    env, log = stand_ins
    profile = profile_copy(tmp_path, "summit", activate="", staging_path=str(tmp_path / "bb"), ranks_per_node=1)
    sub = jobs.submit("train", **train_job(tiny_dataset, tmp_path / "run", machine=profile, nodes=1), dry_run=True)
    done = subprocess.run(["bash", str(sub.script)], env={**env, "LSB_JOBID": "777"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[:3] == ["module load gcc", "module load cuda", "module load spectrum-mpi"]
    stage, run = tmp_path / "bb" / "stemnet-777", tmp_path / "run"
    assert f"stemnet stage {tiny_dataset} --to {stage}/rank0 --rank 0 --world 1 [rank=0]" in calls
    assert (f"stemnet train --config {sub.script.with_suffix('.yaml')} --data {stage}/rank0 "
            f"--out {run} --no-progress [rank=0]") in calls
    # staging before training, both for real: the staged copy verifies, the run finished
    assert max(i for i, c in enumerate(calls) if "stage" in c) < min(i for i, c in enumerate(calls) if " train " in c)
    staged = stage / "rank0"  # the one rank's copy: the train and val shards (stage's default), not test
    for split in ("train", "val"):
        assert sorted(p.name for p in (staged / split).glob("shard-*.lmdb")) == sorted(
            p.name for p in (tiny_dataset / split).glob("shard-*.lmdb"))
    assert not (staged / "test").exists() and (staged / "manifest.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == load_config(TRAINING).train.steps
    # node-local outputs copied back to the run folder
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert sorted(p.name for p in (run / "node-out" / host).iterdir()) == ["rank-0.txt"]


@pytest.mark.slow
def test_lsf_training_script_forwards_usr2(tmp_path, tiny_dataset, stand_ins):
    """The walltime warning (SIGUSR2 to the batch shell) reaches the training rank, which
    checkpoints and stops; the job's status says it was interrupted (128 + 12)."""
    env, log = stand_ins
    profile = profile_copy(tmp_path, "summit", activate="", staging_path=str(tmp_path / "bb"), ranks_per_node=1)
    run = tmp_path / "run"
    sub = jobs.submit("train", **train_job(tiny_dataset, run, machine=profile, nodes=1), dry_run=True,
                      overrides=["train.steps=100000", "train.checkpoint_every=5", "train.val_every=100000"])
    proc = subprocess.Popen(["bash", str(sub.script)], env={**env, "LSB_JOBID": "778"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # the first periodic checkpoint: the trainer's signal handler is installed by then
        while not any((run / "checkpoints").glob("ckpt-*.index")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGUSR2)  # the batch shell only, as LSF's -wa would
        out, err = proc.communicate(timeout=600)  # a hang guard, not a speed target
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGUSR2, err
    assert "every rank checkpoints and stops" in err and "launcher: USR2" in log.read_text()
    step = int(re.search(r"signal 12: checkpoint written at step (\d+)", err).group(1))
    assert (run / "checkpoints" / f"ckpt-{step}.index").is_file() and 5 <= step < 100000


@pytest.mark.slow
def test_slurm_simulation_script_runs_and_finalizes(tmp_path, stand_ins):
    env, log = stand_ins
    profile = profile_copy(tmp_path, "frontier", activate="", ranks_per_node=1)
    sub = jobs.submit("simulate", machine=profile, nodes=2, walltime="01:00", project="MAT123",
                      config=SIMULATION, out=tmp_path / "ds", dry_run=True)
    done = subprocess.run(["bash", str(sub.script)], env={**env, "SLURM_JOB_ID": "55"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    cfg, ds = sub.script.with_suffix(".yaml"), tmp_path / "ds"
    ranks = [c for c in calls if c.startswith("stemnet simulate --config")]
    assert sorted(ranks) == sorted(f"stemnet simulate --config {cfg} --out {ds} --no-progress --wait 0 [rank={r}]"
                                   for r in range(2))
    assert calls[-1] == f"stemnet simulate --finalize {ds} --config {cfg} [rank=]"  # once, after all ranks
    assert "module load rocm" in calls
    verify(ds)  # both ranks' shards and the manifest, for real
    shards = sorted(p.name for p in (ds / "train").glob("shard-*.lmdb"))
    assert len(shards) == 2, shards  # one per rank


@pytest.mark.slow
def test_local_chain_runs_in_the_foreground(tmp_path, stand_ins, monkeypatch):
    env, log = stand_ins
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    profile = profile_copy(tmp_path, "local", activate="", ranks_per_node=1, cores_per_rank=2)
    sub = jobs.submit("simulate", machine=profile, nodes=1, walltime=None, project=None,
                      config=SIMULATION, out=tmp_path / "ds", chain=2)
    assert sub.job_ids == ["local-1", "local-2"]
    calls = log.read_text().splitlines()
    assert calls.count("horovodrun -np 1 -H localhost:1 --gloo stemnet simulate --config "
                       f"{sub.script.with_suffix('.yaml')} --out {tmp_path / 'ds'} --no-progress --wait 0") == 2
    assert sum("--finalize" in c for c in calls) == 2
    verify(tmp_path / "ds")
    second = (sub.script.parent / f"simulate.local-{sub.script.stem}-2.out").read_text()
    assert "simulated 0 new of" in second  # job 2 found job 1's samples: it resumed, nothing redone
    with pytest.raises(UserError, match=r"nodes 2: local has at most 1 node"):
        jobs.submit("simulate", machine=profile, nodes=2, walltime=None, project=None,
                    config=SIMULATION, out=tmp_path / "ds")


def test_out_path_unusable_in_directives(tmp_path, dataset):
    with pytest.raises(UserError, match=r"out .*my run: the path is used in a scheduler directive"):
        jobs.submit("train", **train_job(dataset, tmp_path / "my run"), dry_run=True)


def test_activation_needs_a_virtual_environment(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(render.sys, "prefix", str(tmp_path / "not-a-venv"))
    with pytest.raises(UserError, match=r"machine summit: its activate line uses \{venv\}, but .*not-a-venv"):
        jobs.submit("train", **train_job(dataset, tmp_path / "run"), dry_run=True)


@pytest.mark.parametrize("machine,backend", [("frontier", "mwms"), ("perlmutter", "mwms"), ("summit", "auto")])
def test_machine_profile_chooses_the_training_backend(tmp_path, dataset, machine, backend):
    """Frontier/Perlmutter profiles say `backend: mwms`: the frozen config trains on MWMS and
    the script sets no Horovod variables; Summit keeps the install's default (Horovod)."""
    sub = jobs.submit("train", **train_job(dataset, tmp_path / "run", machine=machine), dry_run=True)
    frozen = load_config(sub.script.with_suffix(".yaml"), require=("model", "train"))
    assert frozen.distributed.backend == backend
    assert ("HOROVOD_CACHE_CAPACITY" in sub.text) == (backend != "mwms")
    if backend == "mwms":
        assert "TF_CONFIG" in sub.text
    # a config that names its backend keeps it
    kept = jobs.submit("train", **train_job(dataset, tmp_path / "run2", machine=machine),
                       overrides=["distributed.backend=horovod"], dry_run=True)
    assert load_config(kept.script.with_suffix(".yaml"), require=("model", "train")).distributed.backend == "horovod"
