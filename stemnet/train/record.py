"""Debug record of what each step saw (``train.record_batches``), to check exact resume.

``RUN/batches-rank{r}.jsonl``: one JSON line per step, appended as it runs::

    {"step": 7, "index": [global sample indices], "weight": [...], "lr": 0.0029, "loss_scale": null}

``lr`` and ``loss_scale`` are the values the step used (read before it). A resumed run
appends again from its restored step, so the effective history keeps, per step, the last
line written (:func:`read_record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional


def record_path(run, rank: int) -> Path:
    return Path(run) / f"batches-rank{rank}.jsonl"


class BatchRecord:
    """Append one line per step to :func:`record_path`."""

    def __init__(self, run, rank: int):
        Path(run).mkdir(parents=True, exist_ok=True)
        self._file = open(record_path(run, rank), "a")

    def write(self, step: int, targets, lr: float, loss_scale: Optional[float]) -> None:
        line = {"step": int(step), "index": targets["index"].numpy().tolist(),
                "weight": targets["weight"].numpy().tolist(), "lr": float(lr),
                "loss_scale": None if loss_scale is None else float(loss_scale)}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()


def read_record(run, rank: int = 0) -> Dict[int, dict]:
    """Step → the last line written for it (a resumed run replaces what a killed one wrote)."""
    out: Dict[int, dict] = {}
    for text in record_path(run, rank).read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:  # a line cut by a kill
            continue
        out[line["step"]] = line
    return out
