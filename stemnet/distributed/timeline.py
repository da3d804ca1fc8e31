"""Summarise a Horovod timeline: per step, backprop span, allreduce time, overlap, negotiation.

Horovod writes a Chrome-trace JSON when ``HOROVOD_TIMELINE=path`` is set (only the
coordinator, rank 0, writes it). Horovod 0.28 models every tensor as a trace "process"
(``pid``, named by a ``process_name`` metadata event) and writes, per reduction of that
tensor:

- ``B NEGOTIATE_ALLREDUCE`` when the tensor is submitted on this rank (its gradient is
  ready), ``X <rank>`` instants as ranks report ready (absent on response-cache hits),
  ``E`` when every rank has it;
- ``B ALLREDUCE`` (the response type) … ``E`` (with ``dtype`` and ``shape`` args), and
  nested inside it activities such as ``INIT_FUSION_BUFFER``, ``MEMCPY_IN_FUSION_BUFFER``,
  ``GLOO_ALLREDUCE`` / ``NCCL_ALLREDUCE`` / ``MPI_ALLREDUCE``, ``MEMCPY_OUT_FUSION_BUFFER``;
- ``i CYCLE_START`` global instants, once per background-loop cycle, when
  ``HOROVOD_TIMELINE_MARK_CYCLES=1``.

Grouped allreduces (``groups=`` of ``DistributedGradientTape``) name their tensors
``…HorovodGroupedAllreduce_<names>_<k>of<n>``: one group is the tensors sharing the prefix.

Definitions (timestamps in µs, reported in ms)
----------------------------------------------
- **Steps.** TensorFlow compute is not in the timeline and cycles are much shorter than a
  step, so steps are found from the repeating tensor pattern: a gradient tensor is reduced
  once per step, so taking the reductions in order of their negotiation start, a new step
  begins when a tensor already reduced in the current step starts again. Only
  ``ALLREDUCE``/``ADASUM`` reductions form steps; broadcasts and other ops are counted
  apart. Cycle marks are counted per step for information.
- **Backprop span** of a step: from the first tensor's negotiation start (first gradient
  ready on rank 0) to the last tensor's negotiation start (last gradient ready). It is a
  lower bound on backprop: the compute before the first gradient is invisible. Horovod's
  background thread logs a negotiation start in the cycle that picks the tensor up, so
  "ready" times are late by up to one ``HOROVOD_CYCLE_TIME`` (1 ms by default).
- **Communication**: the union of the steps' ``ALLREDUCE`` intervals (tensors of one fused
  or grouped operation share their interval, so the union is wall time, not a sum).
- **Overlapped communication**: the part of it inside the backprop span;
  ``overlap_fraction`` = overlapped / communication; **exposed** = the rest.
- **Negotiation**: the union of ``NEGOTIATE_*`` intervals (wall time), and their sum over
  tensors. With the response cache it is mostly the wait for the slowest rank to produce
  the same gradient (rank skew), not coordinator traffic.

Public API
----------
read_timeline(path) -> list of events; tensor_ops(events) -> list[TensorOp]
summarize_timeline(path_or_events) -> TimelineSummary; format_timeline(summary) -> str
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from stemnet.errors import UserError

STEP_OPS = ("ALLREDUCE", "ADASUM")
GROUP_SUFFIX = re.compile(r"_(\d+)of(\d+)$")

Interval = Tuple[float, float]


class TimelineError(UserError, ValueError):
    """An unreadable timeline file, as one line."""


# ----------------------------------------------------------------------------- parsing
def read_timeline(path: Union[str, Path]) -> List[dict]:
    """The events of a Horovod timeline file.

    Tolerates a file cut short while Horovod was writing it (a missing closing ``]`` or a
    half-written last event is dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise TimelineError(f"{path}: no such timeline file")
    text = path.read_text().strip()
    if not text:
        raise TimelineError(f"{path}: empty file; expected a Horovod timeline (HOROVOD_TIMELINE)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        cut = text.rstrip(",] \n")
        for _ in range(3):  # drop a half-written last event
            try:
                data = json.loads(cut + "]")
                break
            except json.JSONDecodeError:
                brace = cut.rfind("}", 0, len(cut) - 1)
                if brace < 0:
                    break
                cut = cut[: brace + 1]
        if data is None:
            raise TimelineError(f"{path}: not JSON; expected a Horovod (Chrome trace) timeline") from None
    if isinstance(data, dict):
        data = data.get("traceEvents", [])
    if not isinstance(data, list):
        raise TimelineError(f"{path}: expected a JSON list of trace events, got {type(data).__name__}")
    return [e for e in data if isinstance(e, dict)]


@dataclass
class TensorOp:
    """One collective on one tensor, as rank 0 saw it (timestamps in µs)."""

    tensor: str
    op: str  # ALLREDUCE, ADASUM, BROADCAST, ALLGATHER, ...
    start: float
    end: float
    negotiate_start: Optional[float] = None
    negotiate_end: Optional[float] = None
    activities: Dict[str, float] = field(default_factory=dict)  # name -> µs
    activity_intervals: List[Tuple[str, float, float]] = field(default_factory=list)
    shape: str = ""
    dtype: str = ""

    @property
    def ready(self) -> float:
        """When the tensor was submitted (negotiation start; the op start if none was logged)."""
        return self.negotiate_start if self.negotiate_start is not None else self.start


def tensor_ops(events: Iterable[dict]) -> Tuple[List[TensorOp], int]:
    """Pair the B/E events of every tensor into :class:`TensorOp` records.

    Returns ``(ops in order of readiness, number of incomplete ops)`` -- an op still open at
    the end of the file is incomplete and left out.
    """
    names: Dict[int, str] = {}
    per_pid: Dict[int, list] = defaultdict(list)
    for e in events:
        ph, pid = e.get("ph"), e.get("pid")
        if ph == "M":
            if e.get("name") == "process_name" and "name" in e.get("args", {}):
                names[pid] = e["args"]["name"]
        elif ph in ("B", "E") and pid is not None:
            per_pid[pid].append(e)
    ops: List[TensorOp] = []
    incomplete = 0
    for pid, evs in per_pid.items():
        tensor = names.get(pid, f"pid{pid}")
        stack: List[Tuple[str, float]] = []
        negotiate: Optional[Interval] = None
        current: Optional[TensorOp] = None
        for e in evs:
            ts = float(e.get("ts", 0))
            if e["ph"] == "B":
                name = e.get("name", "")
                if not stack and name.startswith("NEGOTIATE_"):
                    negotiate = (ts, None)
                elif not stack:
                    current = TensorOp(tensor, name, ts, ts)
                    if negotiate is not None:
                        current.negotiate_start, current.negotiate_end = negotiate
                        negotiate = None
                stack.append((name, ts))
                continue
            if not stack:  # an E without its B (file started mid-way): skip
                continue
            name, began = stack.pop()
            if stack:  # an activity inside the op
                if current is not None:
                    current.activities[name] = current.activities.get(name, 0.0) + ts - began
                    current.activity_intervals.append((name, began, ts))
            elif name.startswith("NEGOTIATE_"):
                negotiate = (began, ts)
            elif current is not None:
                current.end = ts
                args = e.get("args", {})
                current.shape, current.dtype = str(args.get("shape", "")), str(args.get("dtype", ""))
                ops.append(current)
                current = None
        incomplete += (current is not None) + (negotiate is not None)
    ops.sort(key=lambda op: (op.ready, op.start))
    return ops, incomplete


# ---------------------------------------------------------------------------- intervals
def _union(intervals: Iterable[Interval]) -> List[Interval]:
    merged: List[List[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: Sequence[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def _clip(intervals: Sequence[Interval], lo: float, hi: float) -> List[Interval]:
    return [(max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo)]


def group_name(tensor: str) -> str:
    """The group a grouped-allreduce tensor belongs to (its name without ``_<k>of<n>``)."""
    return GROUP_SUFFIX.sub("", tensor)


# ------------------------------------------------------------------------------ summary
@dataclass
class StepSummary:
    """One training step as the timeline shows it (ms)."""

    index: int
    tensors: int
    groups: int
    first_ready_ms: float  # from the start of the timeline
    backprop_span_ms: float
    comm_ms: float
    overlapped_ms: float
    exposed_ms: float
    overlap_fraction: float
    negotiation_ms: float  # wall time with some tensor negotiating
    negotiation_sum_ms: float  # summed over tensors
    tail_ms: float  # last allreduce end - last gradient ready
    span_ms: float  # first gradient ready -> last allreduce end
    cycles: int
    activities_ms: Dict[str, float] = field(default_factory=dict)  # union per activity


@dataclass
class TimelineSummary:
    """A whole timeline: its steps and totals."""

    path: str
    tensors: List[str]
    groups: int
    steps: List[StepSummary]
    other_ops: Dict[str, int]
    incomplete: int
    cycles: int

    def to_dict(self) -> dict:
        return asdict(self)

    def mean(self, key: str, skip_first: bool = True) -> float:
        """Mean of a step field, leaving out the first step (warm-up) when there are others."""
        steps = self.steps[1:] if skip_first and len(self.steps) > 1 else self.steps
        return sum(getattr(s, key) for s in steps) / len(steps) if steps else 0.0


def split_steps(ops: Sequence[TensorOp]) -> List[List[TensorOp]]:
    """Reductions (in readiness order) cut into steps where a tensor repeats."""
    steps: List[List[TensorOp]] = []
    seen: set = set()
    for op in ops:
        if not steps or op.tensor in seen:
            steps.append([])
            seen = set()
        steps[-1].append(op)
        seen.add(op.tensor)
    return steps


def _step_summary(index: int, ops: Sequence[TensorOp], cycle_marks: Sequence[float]) -> StepSummary:
    ready = [op.ready for op in ops]
    lo, hi = min(ready), max(ready)
    comm = _union((op.start, op.end) for op in ops)
    comm_len = _length(comm)
    overlapped = _length(_clip(comm, lo, hi))
    negotiations = [(op.negotiate_start, op.negotiate_end) for op in ops
                    if op.negotiate_start is not None and op.negotiate_end is not None]
    end = max(op.end for op in ops)
    acts: Dict[str, List[Interval]] = defaultdict(list)
    for op in ops:
        for name, a, b in op.activity_intervals:
            acts[name].append((a, b))
    ms = 1e-3
    return StepSummary(
        index=index,
        tensors=len(ops),
        groups=len({group_name(op.tensor) for op in ops}),
        first_ready_ms=lo * ms,
        backprop_span_ms=(hi - lo) * ms,
        comm_ms=comm_len * ms,
        overlapped_ms=overlapped * ms,
        exposed_ms=(comm_len - overlapped) * ms,
        overlap_fraction=overlapped / comm_len if comm_len > 0 else 0.0,
        negotiation_ms=_length(_union(negotiations)) * ms,
        negotiation_sum_ms=sum(b - a for a, b in negotiations) * ms,
        tail_ms=(end - hi) * ms,
        span_ms=(end - lo) * ms,
        cycles=sum(1 for t in cycle_marks if lo <= t <= end),
        activities_ms={k: _length(_union(v)) * ms for k, v in sorted(acts.items())},
    )


def summarize_timeline(source: Union[str, Path, Sequence[dict]]) -> TimelineSummary:
    """Steps, backprop spans, communication, overlap and negotiation of a Horovod timeline."""
    events = read_timeline(source) if isinstance(source, (str, Path)) else list(source)
    ops, incomplete = tensor_ops(events)
    reductions = [op for op in ops if op.op in STEP_OPS]
    other = Counter(op.op for op in ops if op.op not in STEP_OPS)
    marks = sorted(float(e.get("ts", 0)) for e in events if e.get("ph") == "i" and e.get("name") == "CYCLE_START")
    steps = [_step_summary(i, step, marks) for i, step in enumerate(split_steps(reductions))]
    tensors = sorted({op.tensor for op in reductions})
    return TimelineSummary(
        path=str(source) if isinstance(source, (str, Path)) else "",
        tensors=tensors,
        groups=len({group_name(t) for t in tensors}),
        steps=steps,
        other_ops=dict(other),
        incomplete=incomplete,
        cycles=len(marks),
    )


def format_timeline(summary: TimelineSummary) -> str:
    """The text ``stemnet timeline`` prints: one line per step, then means without step 0."""
    lines = [
        f"{summary.path or 'timeline'}: {len(summary.steps)} steps, {len(summary.tensors)} tensors in "
        f"{summary.groups} allreduce groups, {summary.cycles} cycle marks"
        + (f", other ops {summary.other_ops}" if summary.other_ops else "")
        + (f", {summary.incomplete} incomplete" if summary.incomplete else ""),
        "backprop span = first to last gradient ready (negotiation starts); times in ms",
    ]
    cols = ("step", "tensors", "backprop", "comm", "overlap", "exposed", "overlap %", "negotiate", "tail", "cycles")
    lines.append("  ".join(f"{c:>9}" for c in cols))
    for s in summary.steps:
        vals = (s.index, s.tensors, f"{s.backprop_span_ms:.3f}", f"{s.comm_ms:.3f}", f"{s.overlapped_ms:.3f}",
                f"{s.exposed_ms:.3f}", f"{100 * s.overlap_fraction:.1f}", f"{s.negotiation_ms:.3f}",
                f"{s.tail_ms:.3f}", s.cycles)
        lines.append("  ".join(f"{v:>9}" for v in vals))
    if len(summary.steps) > 1:
        lines.append(
            f"mean of steps 1-{len(summary.steps) - 1}: backprop {summary.mean('backprop_span_ms'):.3f} ms, "
            f"communication {summary.mean('comm_ms'):.3f} ms, {100 * summary.mean('overlap_fraction'):.1f}% overlapped, "
            f"negotiation {summary.mean('negotiation_ms'):.3f} ms")
    acts: Dict[str, float] = defaultdict(float)
    for s in summary.steps[1:] or summary.steps:
        for k, v in s.activities_ms.items():
            acts[k] += v
    if acts:
        n = max(1, len(summary.steps) - 1)
        lines.append("activities per step (mean): " + ", ".join(f"{k} {v / n:.3f} ms" for k, v in acts.items()))
    return "\n".join(lines)
