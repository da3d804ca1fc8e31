"""Running stemnet on clusters: machine profiles, job scripts, submission.

``machines`` (the one loader of ``configs/machines/*.yaml``, shared with the scaling
model), ``render`` (validated request -> batch script), ``submit`` (``stemnet submit``).
This module stays light (no pydantic): the CLI registers ``submit`` from it at start-up.
"""

from typing import List

from stemnet.shipped import shipped_dir

MACHINES_DIR = shipped_dir("configs") / "machines"  # package data in a wheel, configs/ in a checkout
TASKS = ("simulate", "train")


def machine_names() -> List[str]:
    """Names of the shipped profiles (``configs/machines``)."""
    return sorted(p.stem for p in MACHINES_DIR.glob("*.yaml"))
