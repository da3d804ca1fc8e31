"""``bench grouping``: step time per gradient-grouping strategy on 2 ranks, per backend
(Horovod over Gloo under horovodrun, MWMS over gRPC under ``stemnet launch``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stemnet.bench.common import shipped


def _steptime(np_ranks: int, model_config, input_shape, batch, steps, strategies, backend: str = "horovod") -> list:
    cmd = [sys.executable, "-m", "stemnet.distributed.steptime", "--model", str(model_config),
           "--input-shape", ",".join(map(str, input_shape)), "--batch", str(batch), "--steps", str(steps),
           "--backend", backend, *strategies]
    if np_ranks > 1 and backend == "horovod":
        horovodrun = str(Path(sys.executable).parent / "horovodrun")
        cmd = [horovodrun, "-np", str(np_ranks), "-H", f"localhost:{np_ranks}", "--gloo"] + cmd
    elif np_ranks > 1:
        cmd = [sys.executable, "-m", "stemnet.cli", "launch", "-n", str(np_ranks), "--"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"steptime ({backend}) on {np_ranks} rank(s) failed: {proc.stderr[-2000:]}")
    rows = []
    for line in proc.stdout.splitlines():
        start = line.find("{")
        if start >= 0 and '"strategy"' in line:
            rows.append(json.loads(line[start:]))
    missing = set(strategies) - {r["strategy"] for r in rows}
    if missing:
        raise RuntimeError(f"steptime ({backend}) on {np_ranks} rank(s) printed no row for {sorted(missing)}: "
                           f"{proc.stdout[-2000:]}")
    return rows


def bench_grouping(config=None, input_shape=(16, 16, 2), batch: int = 16,
                   steps: int = 20, strategies=("none", "count:4", "layer", "graph"), backends=None) -> dict:
    """2 ranks: step time per strategy relative to ``none``, and 2 vs 1 rank, per backend.

    ``backends`` defaults to every installed one, measured one after the other in this
    call. Horovod's keys are unprefixed; the others carry their name
    (``mwms_ratio_graph_vs_none``, ``mwms_efficiency_np2``).
    """
    from stemnet.distributed.backends import horovod_available

    config = config or shipped("training/demo.yaml")
    backends = list(backends or (["horovod", "mwms"] if horovod_available() else ["mwms"]))
    result = {"config": str(config), "input_shape": list(input_shape), "batch_per_rank": batch,
              "backends": backends}
    model = _model_efficiency_np2(config, input_shape, batch, strategies)
    for backend in backends:
        p = "" if backend == "horovod" else f"{backend}_"
        two = {r["strategy"]: r for r in _steptime(2, config, input_shape, batch, steps, strategies, backend)}
        one = {r["strategy"]: r for r in _steptime(1, config, input_shape, batch, steps, ["none"], backend)}
        result[p + "np2"], result[p + "np1"] = two, one
        for strategy in strategies:
            if strategy != "none":
                result[p + "ratio_" + strategy.replace(":", "") + "_vs_none"] = \
                    two[strategy]["step_s"] / two["none"]["step_s"]
        best = min(two.values(), key=lambda r: r["step_s"])
        result[p + "efficiency_np2"] = two["none"]["samples_per_s"] / (2 * one["none"]["samples_per_s"])
        result[p + "efficiency_np2_best"] = best["samples_per_s"] / (2 * one["none"]["samples_per_s"])
        result[p + "best_strategy"] = best["strategy"]
        result[p + "model_efficiency_np2_best"] = model[best["strategy"]]
    result["model_efficiency_np2"] = model["none"]
    result["model"] = {"machine": "local", "efficiency_np2": model,
                       "note": "communication only (calibrated alpha-beta of configs/machines/local.yaml); "
                               "the measured efficiency also pays for 2 ranks sharing 2 cores"}
    return result


def _model_efficiency_np2(config, input_shape, batch: int, strategies) -> dict:
    """The scaling model's 2-rank efficiency T(1)/T(2) per strategy for this run: compute
    measured here (one process), communication from the calibrated ``local`` profile."""
    from stemnet.config import load_config
    from stemnet.distributed.scaling import load_network, measure_workload, simulate_step

    cfg = load_config(config, require=("model",))
    network = load_network("local")
    h, w, _ = input_shape
    work = measure_workload(cfg.model, input_shape, (h, w), batch=batch, repeats=5, probes=8)
    return {s: simulate_step(work, s, 1, network, dist=cfg.distributed).step_s
            / simulate_step(work, s, 2, network, dist=cfg.distributed).step_s for s in strategies}
