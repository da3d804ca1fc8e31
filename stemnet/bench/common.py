"""What every benchmark shares: shipped config paths, a best-of timer, JSON output."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


def shipped(relative: str) -> Path:
    """A shipped config file, e.g. ``shipped("training/demo.yaml")``."""
    from stemnet.shipped import shipped_dir

    return shipped_dir("configs") / relative


def rate(fn, count: int, repeats: int = 3) -> float:
    """Best of ``repeats``: ``count`` items / seconds of ``fn()``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def write(result: dict, path: Optional[Path]) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
