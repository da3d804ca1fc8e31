"""Which records each rank reads: shards round-robin over ranks, strided when shared,
and the per-epoch order with weight-0 padding so every rank runs the same steps.

Non-empty shards of a split go round-robin to ranks (rank ``r`` reads shards ``r``,
``r + W``, …). With fewer shards than ranks, shard ``s`` is shared by ranks ``s``,
``s + S``, … which take its records (in key order) with a stride. Every sample of the
split is read by exactly one rank once per epoch. Ranks may hold different numbers of
samples, but all ranks must run the same number of steps (a rank that stops early
hangs the others in an allreduce), so every rank yields
``ceil(max_rank_samples / batch_size)`` full batches per epoch: the slots left over are
filled with repeats of the rank's own samples carrying ``weight = 0``. The assignment
is a pure function of the manifest, so :func:`stemnet.stage.stage` copies exactly the
shards a rank will read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from stemnet.errors import UserError


@dataclass(frozen=True)
class ShardSlice:
    """Part of one shard read by one rank: records ``offset::stride`` in key order."""

    path: str  # relative to the dataset folder, e.g. "train/shard-00000.lmdb"
    offset: int
    stride: int
    count: int  # records this rank reads from the shard
    total: int  # records in the shard (manifest)


def _split_shards(manifest: dict, split: str, where: str) -> List[dict]:
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise UserError(f"{where}: no split {split!r} in the manifest; expected one of {sorted(splits)}")
    shards = [s for s in splits[split]["shards"] if int(s["count"]) > 0]
    if not shards:
        raise UserError(f"{where}: split {split!r} has no samples")
    return shards


def assign_shards(manifest: dict, split: str, rank: int, world: int, where: str = "dataset") -> List[List[ShardSlice]]:
    """The shard slices of every rank (a list of ``world`` lists), from the manifest alone.

    Non-empty shards go round-robin to ranks; with fewer shards than ranks, records of a
    shard are strided over the ranks that share it. ``rank`` is only validated.

    Raises
    ------
    UserError
        Unknown or empty split, bad rank/world, more ranks than samples, or a rank
        that would get no sample at all.
    """
    world, rank = int(world), int(rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} of world {world}: expected 0 <= rank < world")
    shards = _split_shards(manifest, split, where)
    total = sum(int(s["count"]) for s in shards)
    if world > total:
        raise UserError(
            f"{where}: split {split!r} has {total} samples but {world} ranks; "
            f"expected at most {total} ranks"
        )
    per_rank: List[List[ShardSlice]] = [[] for _ in range(world)]
    n_shards = len(shards)
    if n_shards >= world:
        for k, s in enumerate(shards):
            n = int(s["count"])
            per_rank[k % world].append(ShardSlice(s["path"], 0, 1, n, n))
    else:
        for r in range(world):
            k = r % n_shards
            sharing = len(range(k, world, n_shards))
            j = r // n_shards
            n = int(shards[k]["count"])
            per_rank[r].append(ShardSlice(shards[k]["path"], j, sharing, len(range(j, n, sharing)), n))
    for r, slices in enumerate(per_rank):
        if sum(s.count for s in slices) == 0:
            counts = [int(s["count"]) for s in shards]
            raise UserError(
                f"{where}: split {split!r}: rank {r} of {world} would get no samples "
                f"(shard counts {counts}); use fewer ranks or more evenly filled shards"
            )
    return per_rank


@dataclass(frozen=True)
class SplitPlan:
    """What one rank reads from one split, per epoch."""

    split: str
    rank: int
    world: int
    batch_size: int
    shards: Tuple[ShardSlice, ...]  # this rank's
    rank_samples: Tuple[int, ...]  # every rank's real samples per epoch
    batches_per_epoch: int

    @property
    def samples(self) -> int:
        """Real (weight-1) samples this rank yields per epoch."""
        return self.rank_samples[self.rank]

    @property
    def padding(self) -> int:
        """Weight-0 repeats this rank adds per epoch."""
        return self.batches_per_epoch * self.batch_size - self.samples


def plan_split(manifest: dict, split: str, *, rank: int = 0, world: int = 1,
               batch_size: int, where: str = "dataset") -> SplitPlan:
    """Rank ``rank``'s shards and the common number of batches per epoch."""
    if int(batch_size) < 1:
        raise UserError(f"batch_size {batch_size}: expected a positive integer")
    per_rank = assign_shards(manifest, split, rank, world, where)
    counts = tuple(sum(s.count for s in slices) for slices in per_rank)
    batches = -(-max(counts) // int(batch_size))
    return SplitPlan(split, int(rank), int(world), int(batch_size), tuple(per_rank[rank]), counts, batches)


def epoch_order(plan: SplitPlan, epoch: int, *, shuffle: bool = True, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Local record positions (into the rank's records) and weights for one epoch.

    Returns arrays of length ``batches_per_epoch * batch_size``: the rank's records once
    each with weight 1, padded with repeats carrying weight 0 (randomly placed when
    shuffling, at the end otherwise).
    """
    n = plan.samples
    slots = plan.batches_per_epoch * plan.batch_size
    rng = np.random.default_rng([int(seed), int(epoch), int(plan.rank), 0x5EED])
    order = rng.permutation(n) if shuffle else np.arange(n)
    pad = slots - n
    ids = np.concatenate([order, order[np.arange(pad) % n]]).astype(np.int64)
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if shuffle and pad:
        mix = rng.permutation(slots)
        ids, weights = ids[mix], weights[mix]
    return ids, weights
