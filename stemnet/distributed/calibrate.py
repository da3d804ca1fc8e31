"""Calibrate the scaling model on this machine, and check it against a measured step.

``stemnet scaling --calibrate`` runs one ``horovodrun -np 2 --gloo`` job that, on both
ranks at once:

1. times back-to-back Horovod allreduces (float32, Average) of messages from a few KiB
   to tens of MiB: the median per allreduce, each one waiting for the previous
   (a chain inside one ``tf.function``, so they cannot be fused);
2. measures the demo model's compute with both ranks busy (the contention a 2-rank step
   has): forward, update, and per-layer backward times at several probe layers
   (``stemnet.distributed.workload.measure_workload(probes=...)``);
3. times the real 2-rank training step per grouping strategy
   (``stemnet.distributed.steptime``).

The parent fits ``t(S) = α + β·S`` to (1) (least squares, weighted by 1/t so that small
and large messages count alike), writes α and β into the machine profile's ``network:``
section (two ranks on one node: ``intra_node.bandwidth_gbs = 1/β``; α, which with two
ranks cannot be told apart from the per-step latency, goes to ``allreduce_overhead_us``
and ``intra_node.latency_us`` is 0; ``comm_overlaps_compute`` is false: on CPU ranks Gloo's
copies and sums run on the cores that compute), and predicts (3) from (2) with the
calibrated network: prediction against measurement per strategy.

The whole job runs at a short Horovod cycle (``CALIBRATION_CYCLE_MS``): each allreduce of
the chain waits for the background thread's next tick, so at the config's cycle α would be
the cycle and the model (which adds ticks itself) would count it twice. The prediction
quantises every group to the cycle (``cycle_groups=True``), as Horovod does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from stemnet.errors import argument
from stemnet.shipped import shipped_dir

DEFAULT_CONFIG = shipped_dir("configs") / "training" / "demo.yaml"
DEFAULT_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)  # the demo model: 0.27 MiB
CHAIN = 8  # allreduces per timed call
CALIBRATION_CYCLE_MS = 0.1  # HOROVOD_CYCLE_TIME of the calibration job (see calibrate())


# ------------------------------------------------------------------ inside horovodrun
def worker(model_config: str, input_shape, batch: int, steps: int, sizes: Sequence[int], repeats: int,
           probes: int, strategies: Sequence[str]) -> None:
    """What every rank runs; rank 0 prints one JSON line per result."""
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    from stemnet.config import load_config
    from stemnet.distributed.steptime import measure
    from stemnet.distributed.workload import measure_workload

    hvd.init()
    out = []
    for nbytes in sizes:
        x0 = tf.ones(max(1, nbytes // 4), tf.float32)

        @tf.function
        def chained(x=x0, nbytes=nbytes):
            for k in range(CHAIN):
                x = hvd.allreduce(x, op=hvd.Average, name=f"calibrate_{nbytes}_{k}")
            return x

        chained().numpy()  # trace, negotiate, fill the response cache
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            chained().numpy()
            samples.append((time.perf_counter() - t0) / CHAIN)
        out.append({"kind": "allreduce", "bytes": int(x0.shape[0]) * 4, "seconds": float(np.median(samples))})

    cfg = load_config(model_config, require=("model",))
    h, w, _ = input_shape
    work = measure_workload(cfg.model, input_shape, (h, w), batch=batch, repeats=repeats, probes=probes)
    hvd.allreduce(tf.constant(0.0), name="calibrate_barrier")
    out.append({"kind": "workload", "forward_s": work.forward_s, "update_s": work.update_s,
                "layers": [[layer.name, layer.grad_bytes, layer.backward_s] for layer in work.layers],
                "tape_order": [list(t) for t in work.tape_order], "source": work.source})
    for row in measure(model_config, input_shape, batch, steps, strategies, quiet=True):
        out.append({"kind": "step", **row})
    # the same training step without any collective, both ranks computing at once: the
    # step's own work beyond forward + backward + update (loss, metrics, dispatch)
    hvd.allreduce(tf.constant(0.0), name="calibrate_barrier_local")
    (local,) = measure(model_config, input_shape, batch, steps, ["none"], quiet=True, backend="local")
    out.append({"kind": "local_step", "step_s": local["step_s"]})
    if hvd.rank() == 0:
        for row in out:
            print("CALIBRATE " + json.dumps(row), flush=True)


# --------------------------------------------------------------------------- parent
def fit_alpha_beta(points: Sequence[Dict]) -> Dict[str, float]:
    """Least-squares ``t = α + β·S`` (weights 1/t); α in s, β in s/byte, and the worst misfit."""
    import numpy as np

    s = np.array([p["bytes"] for p in points], float)
    t = np.array([p["seconds"] for p in points], float)
    beta, alpha = np.polyfit(s, t, 1, w=1 / t)
    alpha, beta = max(float(alpha), 0.0), max(float(beta), 1e-15)
    misfit = float(np.max(np.abs(alpha + beta * s - t) / t))
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "max_relative_misfit": misfit}


def machine_load() -> str:
    """``"quiet"`` or ``"under load (load average X on N cores)"``, before we add ours."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return "quiet" if load < 0.25 * cores else f"under load (load average {load:.1f} on {cores} cores)"


def run_worker(config: Path, input_shape, batch: int, steps: int, sizes, repeats: int, probes: int,
               strategies, env: Dict[str, str]) -> List[Dict]:
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    cmd = [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
           "stemnet.distributed.calibrate", "--worker", "--model", str(config),
           "--input-shape", ",".join(map(str, input_shape)), "--batch", str(batch), "--steps", str(steps),
           "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats), "--probes", str(probes), *strategies]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"calibration run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    rows = []
    for line in proc.stdout.splitlines():
        at = line.find("CALIBRATE ")
        if at >= 0:
            rows.append(json.loads(line[at + len("CALIBRATE "):]))
    return rows


def calibrate(config, machine: str = "local", *, input_shape=(16, 16, 2), batch: int = 16, steps: int = 20,
              sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 10, probes: int = 8,
              strategies: Sequence[str] = ("none", "count:4", "layer", "graph"),
              write: Optional[Path] = None, cycle_time_ms: float = CALIBRATION_CYCLE_MS) -> dict:
    """Measure, fit, predict; optionally write the calibrated profile to ``write``. JSON-ready."""
    import yaml

    from stemnet.config import load_config
    from stemnet.distributed.runtime import horovod_environment
    from stemnet.distributed.scaling import LayerCost, Workload, check_strategies, simulate_step
    from stemnet.hpc.machines import Link, ProfileError, load_profile

    check_strategies(strategies)
    cfg = load_config(config, require=("model",))
    profile = load_profile(machine, ("network",))
    if profile.network.gpus_per_node < 2:
        raise ProfileError(f"{argument('machine')} {machine}: network.gpus_per_node is {profile.network.gpus_per_node}; "
                         "calibration runs 2 ranks on one node, expected at least 2")
    load = machine_load()
    # The whole job (allreduce chain and measured steps) runs at one short Horovod cycle:
    # each allreduce of the chain waits for the background thread's next tick, so with the
    # config's cycle the fitted alpha would be the cycle itself, and the model, which adds
    # the cycle ticks on its own, would count it twice. Measured and predicted steps both
    # use this cycle, so the check compares like with like.
    dist = cfg.distributed.model_copy(update={"cycle_time_ms": cycle_time_ms})
    # one core per rank, as the local profile describes; Horovod as the config sets it
    env = {**horovod_environment(dist), "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    rows = run_worker(Path(config), input_shape, batch, steps, sizes, repeats, probes, strategies, env)
    points = [r for r in rows if r["kind"] == "allreduce"]
    (work_row,) = [r for r in rows if r["kind"] == "workload"]
    measured = {r["strategy"]: r for r in rows if r["kind"] == "step"}
    fit = fit_alpha_beta(points)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    network = profile.network.model_copy(update={
        "intra_node": Link(bandwidth_gbs=1.0 / fit["beta_s_per_byte"] / 1e9, latency_us=0.0),
        "allreduce_overhead_us": fit["alpha_s"] * 1e6,
        # 2 ranks on a CPU: Gloo's copies and sums run on the cores that compute
        "comm_overlaps_compute": False,
        "calibration": {"by": "stemnet scaling --calibrate", "when": stamp, "machine_state": load,
                        "fit": f"t = {fit['alpha_s'] * 1e6:.1f} us + S / {1 / fit['beta_s_per_byte'] / 1e9:.3g} GB/s "
                               f"over {len(points)} sizes {points[0]['bytes']}..{points[-1]['bytes']} B, "
                               f"2 ranks, horovodrun --gloo, Average, float32, HOROVOD_CYCLE_TIME {cycle_time_ms:g} ms"},
    })
    work = Workload(tuple(LayerCost(n, int(b), float(s)) for n, b, s in work_row["layers"]),
                    work_row["forward_s"], work_row["update_s"],
                    tuple((int(i), int(b)) for i, b in work_row["tape_order"]), work_row["source"])
    local = [r["step_s"] for r in rows if r["kind"] == "local_step"]
    if local:  # what the step without collectives costs beyond forward + backward + update
        work = replace(work, other_s=max(0.0, local[0] - work.forward_s - work.backward_s - work.update_s))
    strategies_out = {}
    for s in strategies:
        # Horovod makes explicit groups wait for the next cycle tick too (cycle_groups)
        predicted = simulate_step(work, s, 2, network, dist=dist, cycle_groups=True)
        m = measured[s]["step_s"]
        strategies_out[s] = {"measured_step_s": m, "predicted_step_s": predicted.step_s,
                             "error": predicted.step_s / m - 1, "allreduces": predicted.allreduces,
                             "groups": measured[s]["groups"]}
    result = {"machine": str(machine), "machine_state": load, "cycle_time_ms": cycle_time_ms, "config": str(config), "input_shape": list(input_shape),
              "batch_per_rank": batch, "allreduce": points, "fit": fit, "network": network.model_dump(),
              "workload": {"source": work.source, "forward_s": work.forward_s, "backward_s": work.backward_s,
                           "update_s": work.update_s, "other_s": work.other_s,
                           "local_step_s": local[0] if local else None, "grad_bytes": work.grad_bytes},
              "strategies": strategies_out}
    if write is not None:
        data = yaml.safe_load(profile.path.read_text())
        data["network"] = network.model_dump(mode="json", exclude_none=True)
        header = (f"# {profile.path.name} with its network: section calibrated by `stemnet scaling --calibrate` "
                  f"({stamp}, {load})\n")
        Path(write).write_text(header + yaml.safe_dump(data, sort_keys=False))
        result["written"] = str(write)
    return result


def format_calibration(result: dict) -> str:
    fit, w = result["fit"], result["workload"]
    lines = [f"allreduce, 2 ranks over Gloo ({result['machine_state']}):",
             f"{'bytes':>10} {'measured us':>12} {'fit us':>9}"]
    for p in result["allreduce"]:
        lines.append(f"{p['bytes']:>10} {p['seconds'] * 1e6:>12.1f} "
                     f"{(fit['alpha_s'] + fit['beta_s_per_byte'] * p['bytes']) * 1e6:>9.1f}")
    lines += [f"fit: alpha {fit['alpha_s'] * 1e6:.1f} us, beta {fit['beta_s_per_byte'] * 1e9:.4g} ns/byte "
              f"({1 / fit['beta_s_per_byte'] / 1e9:.3g} GB/s); worst misfit {fit['max_relative_misfit']:.0%}",
              f"compute ({w['source']}): forward {w['forward_s'] * 1e3:.3g} ms, backward {w['backward_s'] * 1e3:.3g} "
              f"ms, update {w['update_s'] * 1e3:.3g} ms, the rest of the step {w.get('other_s', 0) * 1e3:.3g} ms "
              f"(the step without collectives: {(w.get('local_step_s') or 0) * 1e3:.3g} ms); gradients "
              f"{w['grad_bytes'] / 2**20:.3g} MiB",
              f"2-rank step of {Path(result['config']).name}, input {','.join(map(str, result['input_shape']))}, "
              f"batch {result['batch_per_rank']}/rank, HOROVOD_CYCLE_TIME {result['cycle_time_ms']:g} ms "
              "(model: reductions on the computing cores, groups wait for cycle ticks):",
              f"{'strategy':>9} {'groups':>7} {'measured ms':>12} {'model ms':>9} {'error':>7}"]
    for s, r in result["strategies"].items():
        lines.append(f"{s:>9} {str(r['groups']):>7} {r['measured_step_s'] * 1e3:>12.2f} "
                     f"{r['predicted_step_s'] * 1e3:>9.2f} {r['error']:>+7.1%}")
    if "written" in result:
        lines.append(f"calibrated profile written to {result['written']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="calibration worker (run under horovodrun)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-shape", default="16,16,2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("strategies", nargs="+")
    a = parser.parse_args(argv)
    worker(a.model, tuple(int(v) for v in a.input_shape.split(",")), a.batch, a.steps,
           [int(v) for v in a.sizes.split(",")], a.repeats, a.probes, a.strategies)


if __name__ == "__main__":
    main()
