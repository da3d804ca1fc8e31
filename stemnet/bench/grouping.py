"""``bench grouping``: step time per gradient-grouping strategy on 2 ranks over Gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stemnet.bench.common import shipped


def _steptime(np_ranks: int, model_config, input_shape, batch, steps, strategies) -> list:
    cmd = [sys.executable, "-m", "stemnet.distributed.steptime", "--model", str(model_config),
           "--input-shape", ",".join(map(str, input_shape)), "--batch", str(batch), "--steps", str(steps),
           *strategies]
    if np_ranks > 1:
        horovodrun = str(Path(sys.executable).parent / "horovodrun")
        cmd = [horovodrun, "-np", str(np_ranks), "-H", f"localhost:{np_ranks}", "--gloo"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"steptime on {np_ranks} rank(s) failed: {proc.stderr[-2000:]}")
    rows = []
    for line in proc.stdout.splitlines():
        start = line.find("{")
        if start >= 0 and '"strategy"' in line:
            rows.append(json.loads(line[start:]))
    return rows


def bench_grouping(config=None, input_shape=(16, 16, 2), batch: int = 16,
                   steps: int = 20, strategies=("none", "count:4", "layer", "graph")) -> dict:
    """2 ranks over Gloo: step time per strategy relative to ``none``, and 2 vs 1 rank."""
    config = config or shipped("training/demo.yaml")
    two = {r["strategy"]: r for r in _steptime(2, config, input_shape, batch, steps, strategies)}
    one = {r["strategy"]: r for r in _steptime(1, config, input_shape, batch, steps, ["none"])}
    result = {"config": str(config), "input_shape": list(input_shape), "batch_per_rank": batch,
              "np2": two, "np1": one}
    for strategy in strategies:
        if strategy != "none":
            key = "ratio_" + strategy.replace(":", "") + "_vs_none"
            result[key] = two[strategy]["step_s"] / two["none"]["step_s"]
    best = min(two.values(), key=lambda r: r["step_s"])
    model = _model_efficiency_np2(config, input_shape, batch, strategies)
    result["efficiency_np2"] = two["none"]["samples_per_s"] / (2 * one["none"]["samples_per_s"])
    result["model_efficiency_np2"] = model["none"]
    result["efficiency_np2_best"] = best["samples_per_s"] / (2 * one["none"]["samples_per_s"])
    result["model_efficiency_np2_best"] = model[best["strategy"]]
    result["best_strategy"] = best["strategy"]
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
