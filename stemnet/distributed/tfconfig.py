"""``TF_CONFIG`` for MultiWorkerMirroredStrategy, built from the batch launcher's variables.

- **Slurm** (``srun``; Frontier, Perlmutter): ``SLURM_PROCID``, ``SLURM_NTASKS``, the step's
  node list (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``, hostlist syntax such as
  ``frontier[00001-00003,00010]``) and tasks per node (``SLURM_STEP_TASKS_PER_NODE``, e.g.
  ``8(x2),4``);
- **LSF** (``jsrun``; Summit): ``JSM_NAMESPACE_RANK``/``SIZE``/``LOCAL_RANK`` and the hosts of
  ``LSB_MCPU_HOSTS`` (``host slots`` pairs; a leading 1-slot launch node is left out).

Workers are numbered by rank in block order (the launchers' default: a node's tasks have
consecutive ranks), each on ``host:port_base + local rank``; ``STEMNET_MWMS_PORT_BASE``
(default 12345) sets the base. A rank whose computed host is not its own node (cyclic
distribution) is refused.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Optional

from stemnet.errors import UserError

PORT_BASE = 12345


def expand_hostlist(hostlist: str) -> List[str]:
    """``a[01-03,7],b`` -> ``[a01, a02, a03, a7, b]`` (Slurm's hostlist syntax, zero padding kept)."""
    hosts: List[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]*)(?:\[([^\]]*)\])?([^,\[\]]*),?", hostlist):
        if not (prefix or ranges or suffix):
            continue
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    return hosts


def expand_tasks_per_node(spec: str) -> List[int]:
    """``2(x3),1`` -> ``[2, 2, 2, 1]`` (``SLURM_STEP_TASKS_PER_NODE``)."""
    counts: List[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UserError(f"SLURM_STEP_TASKS_PER_NODE={spec!r}: expected counts like 2(x3),1")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _workers(hosts: List[str], tasks: List[int], port_base: int) -> List[str]:
    return [f"{host}:{port_base + local}" for host, count in zip(hosts, tasks) for local in range(count)]


def _config(workers: List[str], rank: int) -> dict:
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise UserError(f"{name} is not set: cannot build TF_CONFIG") from None
    except ValueError:
        raise UserError(f"{name}={env[name]!r}: expected an integer") from None


def _check_block(workers: List[str], rank: int, host: str, port: int, source: str) -> None:
    if workers[rank] != f"{host}:{port}":
        raise UserError(f"{source}: rank {rank} runs as {host}:{port} but block order puts it at {workers[rank]}; "
                        "expected block task distribution (srun --distribution=block, jsrun -d packed)")


def slurm_tf_config(env: Mapping[str, str], port_base: int = PORT_BASE) -> dict:
    """TF_CONFIG for this ``srun`` task (see the module docstring)."""
    rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) is not set: cannot build TF_CONFIG")
    hosts = expand_hostlist(nodelist)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    tasks = expand_tasks_per_node(spec) if spec else [size // len(hosts)] * len(hosts)
    if len(tasks) != len(hosts) or sum(tasks) != size:
        raise UserError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} on {len(hosts)} node(s) ({nodelist}): "
                        f"expected per-node counts adding up to SLURM_NTASKS={size}")
    workers = _workers(hosts, tasks, port_base)
    if "SLURM_NODEID" in env and "SLURM_LOCALID" in env:
        _check_block(workers, rank, hosts[_int(env, "SLURM_NODEID")], port_base + _int(env, "SLURM_LOCALID"),
                     "Slurm")
    return _config(workers, rank)


def lsf_tf_config(env: Mapping[str, str], port_base: int = PORT_BASE) -> dict:
    """TF_CONFIG for this ``jsrun`` task (see the module docstring)."""
    rank, size = _int(env, "JSM_NAMESPACE_RANK"), _int(env, "JSM_NAMESPACE_SIZE")
    fields = env.get("LSB_MCPU_HOSTS", "").split()
    pairs = list(zip(fields[0::2], fields[1::2]))
    if len(pairs) > 1 and pairs[0][1] == "1":  # the launch (batch) node, as on Summit
        pairs = pairs[1:]
    hosts = [host for host, _ in pairs]
    if not hosts or size % len(hosts):
        raise UserError(f"LSB_MCPU_HOSTS={env.get('LSB_MCPU_HOSTS', '')!r}: expected compute hosts that share "
                        f"JSM_NAMESPACE_SIZE={size} tasks evenly")
    per_host = size // len(hosts)
    workers = _workers(hosts, [per_host] * len(hosts), port_base)
    if "JSM_NAMESPACE_LOCAL_RANK" in env:
        _check_block(workers, rank, hosts[rank // per_host], port_base + _int(env, "JSM_NAMESPACE_LOCAL_RANK"),
                     "jsrun")
    return _config(workers, rank)


def tf_config_from_environment(env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """TF_CONFIG from Slurm or LSF variables, or None outside a batch launcher."""
    env = os.environ if env is None else env
    port_base = int(env.get("STEMNET_MWMS_PORT_BASE", PORT_BASE))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return slurm_tf_config(env, port_base)
    if "JSM_NAMESPACE_RANK" in env and int(env.get("JSM_NAMESPACE_SIZE", "1")) > 1:
        return lsf_tf_config(env, port_base)
    return None


def tf_config_task(env: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, int]]:
    """``{"rank", "world"}`` of this worker from ``TF_CONFIG``, or None when it is unset."""
    import json

    env = os.environ if env is None else env
    if "TF_CONFIG" not in env:
        return None
    try:
        config = json.loads(env["TF_CONFIG"])
        return {"rank": int(config["task"]["index"]), "world": len(config["cluster"]["worker"])}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"TF_CONFIG={env['TF_CONFIG'][:80]!r}: expected JSON with cluster.worker and "
                        "task.index") from None
