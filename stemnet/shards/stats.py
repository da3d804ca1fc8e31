"""Per-channel running statistics of shard fields (count, mean, std, min, max), mergeable."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from stemnet.shards.records import ShardError


class RunningStats:
    """Count, mean, std, min, max per channel (first axis), mergeable and stable.

    Batches are reduced in float64 (two-pass within a batch) and combined with Chan et
    al.'s parallel update, so shards can be merged in any order. ``std`` is the
    population standard deviation (ddof=0). A 0-d field counts as one channel.

    Parameters
    ----------
    channels : int
        Length of the first axis of the arrays to be accumulated.
    """

    def __init__(self, channels: int):
        self.count = np.zeros(channels, np.int64)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    @property
    def channels(self) -> int:
        return len(self.count)

    def update(self, array) -> "RunningStats":
        """Accumulate one array of shape ``(channels, ...)`` in place; return self."""
        x = np.asarray(array, dtype=np.float64)
        channels = x.shape[0] if x.ndim else 1
        if channels != self.channels:
            raise ShardError(f"statistics: array has {channels} channels, expected {self.channels}")
        if x.size == 0:
            return self
        x = x.reshape(channels, -1)
        batch = RunningStats(self.channels)
        batch.count[:] = x.shape[1]
        batch.mean = x.mean(axis=1)
        batch.m2 = ((x - batch.mean[:, None]) ** 2).sum(axis=1)
        batch.min, batch.max = x.min(axis=1), x.max(axis=1)
        self._absorb(batch)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Statistics of both data sets together (a new object; inputs unchanged)."""
        if other.channels != self.channels:
            raise ShardError(
                f"statistics: cannot merge {other.channels} channels into {self.channels}"
            )
        out = self.copy()
        out._absorb(other)
        return out

    def copy(self) -> "RunningStats":
        out = RunningStats(self.channels)
        for name in ("count", "mean", "m2", "min", "max"):
            setattr(out, name, getattr(self, name).copy())
        return out

    def _absorb(self, other: "RunningStats") -> None:
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * nb / safe
        self.m2 = self.m2 + other.m2 + delta**2 * na * nb / safe
        self.count = self.count + other.count
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    def overall(self) -> dict:
        """Count, mean, std, min, max over all channels together."""
        n = int(self.count.sum())
        if n == 0:
            return {"count": 0, "mean": 0.0, "std": 0.0, "min": None, "max": None}
        mean = float((self.count * self.mean).sum() / n)
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        return {"count": n, "mean": mean, "std": float(np.sqrt(m2 / n)),
                "min": float(self.min.min()), "max": float(self.max.max())}

    def to_dict(self) -> dict:
        """JSON-ready: the overall figures plus ``"channels"`` with per-channel lists."""
        n = np.where(self.count > 0, self.count, 1)
        empty = self.count == 0
        per_channel = {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / n).tolist(),
            "min": [None if e else float(v) for e, v in zip(empty, self.min)],
            "max": [None if e else float(v) for e, v in zip(empty, self.max)],
        }
        return {**self.overall(), "channels": per_channel}

    @classmethod
    def from_dict(cls, data: dict) -> "RunningStats":
        """Inverse of :meth:`to_dict` (the second moment is rebuilt from std and count)."""
        ch = data["channels"]
        out = cls(len(ch["count"]))
        out.count = np.asarray(ch["count"], np.int64)
        out.mean = np.asarray(ch["mean"], np.float64)
        out.m2 = np.asarray(ch["std"], np.float64) ** 2 * out.count
        out.min = np.array([np.inf if v is None else v for v in ch["min"]], np.float64)
        out.max = np.array([-np.inf if v is None else v for v in ch["max"]], np.float64)
        return out


def channels_of(shape: Sequence[int]) -> int:
    """Channels of a field of ``shape`` (its first axis; a 0-d field has one)."""
    return int(shape[0]) if len(shape) else 1


def stats_from_header(header: dict) -> Dict[str, RunningStats]:
    """The per-field statistics stored in a shard header."""
    return {name: RunningStats.from_dict(d) for name, d in header["stats"].items()}
