"""``stemnet launch -n N -- COMMAND``: N tf.distribute workers on this machine.

Each worker is COMMAND with its own ``TF_CONFIG`` (a cluster of N workers on free
loopback ports, ``task.index`` = its rank). When one worker fails, the others are
stopped (SIGTERM, then SIGKILL after ``grace_s``: a worker waiting in a collective for a
dead peer cannot act on SIGTERM), and the launcher exits with the failed worker's code,
so a job never hangs on a lost rank. SIGTERM/SIGINT/SIGUSR2 sent to the launcher are
passed on to every worker (their checkpoint-and-leave signals).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from typing import List, Optional, Sequence

from stemnet.log import get_logger

log = get_logger("launch")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def free_ports(count: int, host: str = "127.0.0.1") -> List[int]:
    """``count`` distinct ports the OS reports free on ``host`` (all held open until chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_configs(count: int, host: str = "127.0.0.1") -> List[dict]:
    """One TF_CONFIG per worker: the same cluster, each its own task index."""
    workers = [f"{host}:{port}" for port in free_ports(count, host)]
    return [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}} for i in range(count)]


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(count: int, command: Sequence[str], *, grace_s: float = 10.0, poll_s: float = 0.2) -> int:
    """Run ``command`` as ``count`` workers; 0 when all succeed, else the first failure's code."""
    procs: List[subprocess.Popen] = []
    for config in worker_configs(count):
        env = dict(os.environ, TF_CONFIG=json.dumps(config))
        procs.append(subprocess.Popen(list(command), env=env))
    received: List[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    failed: Optional[int] = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [p for p in procs if p.poll() not in (None, 0)]
            if bad:
                failed = procs.index(bad[0])
                break
            time.sleep(poll_s)
        if failed is None:
            bad = [p for p in procs if p.returncode != 0]
            failed = procs.index(bad[0]) if bad else None
        if failed is not None:
            code = _exit_code(procs[failed].returncode)
            log.error("worker %d exited with code %d: stopping the other %d worker(s)", failed, code,
                      sum(p.poll() is None for p in procs))
            _stop(procs, grace_s)
            return code or 1
        return 128 + received[0] if received else 0
    finally:
        _stop(procs, grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM what still runs, SIGKILL it after ``grace_s`` seconds."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
