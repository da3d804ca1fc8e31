"""Running stemnet on clusters: machine profiles, job scripts, submission.

``machines`` (the one loader of ``configs/machines/*.yaml``, shared with the scaling
model), ``render`` (validated request -> batch script), ``submit`` (``stemnet submit``).
This module stays light (no pydantic): the CLI registers ``submit`` from it at start-up.
"""

from pathlib import Path
from typing import List

MACHINES_DIR = Path(__file__).resolve().parents[2] / "configs" / "machines"
TASKS = ("simulate", "train")


def machine_names() -> List[str]:
    """Names of the shipped profiles (``configs/machines``)."""
    return sorted(p.stem for p in MACHINES_DIR.glob("*.yaml"))
