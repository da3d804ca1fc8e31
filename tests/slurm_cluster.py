"""A one-node Slurm cluster on localhost (Debian's slurm-wlm + munge), for the tests.

:class:`LocalSlurm` writes a ``slurm.conf`` (one node, 2 CPUs; every state, spool, log,
pid and socket file inside one folder; proctrack/linuxproc and task/none, so no cgroups
are needed), starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as
children of the test, and stops each one by its own pid. Clients find the cluster
through ``SLURM_CONF`` (:attr:`LocalSlurm.env`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
INSTALL_HINT = "as root: apt-get install -y slurm-wlm munge (or run `make test` as root, which installs them)"


SEARCH_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"  # daemons live in sbin


def missing_programs() -> List[str]:
    """The Slurm/munge programs not found on PATH (or in /usr/sbin)."""
    return [p for p in DAEMONS + CLIENTS + ("mungekey", "sinfo") if shutil.which(p, path=SEARCH_PATH) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=stemnet-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class LocalSlurm:
    """munged + slurmctld + slurmd on localhost, all state under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.procs: Dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, name: str, argv: List[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        argv = [shutil.which(argv[0], path=SEARCH_PATH), *argv[1:]]
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _wait_for(self, what: str, ready, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}: "
                                       f"{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}: {self.log_tail('slurmctld')} {self.log_tail('slurmd')}")

    def log_tail(self, name: str, lines: int = 5) -> str:
        texts = []
        for path in (self.root / f"{name}.stdout", self.root / f"{name}.log"):
            if path.is_file():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(texts)

    def start(self) -> "LocalSlurm":
        munge = self.root / "munge"
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(munge, 0o700)
        key = munge / "munge.key"
        subprocess.run([shutil.which("mungekey", path=SEARCH_PATH), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self.conf.write_text(SLURM_CONF.format(host=self.host, user=os.environ.get("USER") or "root",
                                               root=self.root, ctld_port=_free_port(), slurmd_port=_free_port()))
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                               f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self._wait_for("munged", lambda: (munge / "munge.socket").exists())
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0)
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for("the node to be idle", lambda: "idle" in self.run(
            ["sinfo", "-h", "-o", "%t"], check=False).stdout)
        return self

    def run(self, argv: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        proc = subprocess.run(argv, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=60, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Reason, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_ids: List[str], timeout_s: float = 600.0, until=None) -> Dict[str, Dict[str, str]]:
        """Poll ``squeue`` until none of ``job_ids`` is queued or running (or ``until()``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until is not None and until():
                return {}
            queued = self.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], check=False).stdout.split()
            if not set(queued) & set(job_ids):
                return {j: self.job_state(j) for j in job_ids}
            time.sleep(0.25)
        raise TimeoutError(f"jobs {job_ids} still queued after {timeout_s:.0f} s: "
                           f"{self.run(['squeue'], check=False).stdout}")

    def stop(self) -> None:
        """Cancel what is left, then stop every daemon by its pid (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "-u", os.environ.get("USER") or "root"], check=False)
        for name in reversed(DAEMONS):
            proc: Optional[subprocess.Popen] = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
