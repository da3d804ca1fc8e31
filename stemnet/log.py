"""Rank-aware logging: rank 0 at INFO, other ranks at WARNING, rank prefix when world > 1."""

from __future__ import annotations

import logging
import sys

from stemnet.ranks import RankInfo, rank_info

LOGGER_NAME = "stemnet"


def setup_logging(verbose: bool = False, *, stream=None, info: RankInfo | None = None) -> logging.Logger:
    """Configure and return the ``stemnet`` logger for this process's rank.

    Call again after ``hvd.init()``: the rank is re-read and the handler replaced.
    ``info`` overrides the detected rank/world.
    """
    info = info or rank_info()
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    prefix = f"[{info.rank}/{info.world}] " if info.world > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(message)s"))
    logger.addHandler(handler)
    if info.rank == 0:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
    logger.propagate = False
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    """A child of the ``stemnet`` logger (``stemnet.<name>``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")
