"""Checkpoints of a run folder: open the manager, restore the newest checkpoint that reads.

A damaged newest checkpoint (a truncated data file, say) is skipped with a warning naming
it, and the run resumes from the newest one that restores; a malformed
``checkpoints/checkpoint`` state file is rebuilt from the ``ckpt-*`` files on disk.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from stemnet.errors import UserError
from stemnet.log import get_logger

log = get_logger("train")
STATE = "checkpoint"  # tf.train.CheckpointManager's state file
_NUMBER = re.compile(r"^ckpt-(\d+)\.index$")


def on_disk(directory) -> List[str]:
    """Checkpoint prefixes (``DIR/ckpt-N``) with an index file, oldest first."""
    found = []
    for path in Path(directory).glob("ckpt-*.index"):
        match = _NUMBER.match(path.name)
        if match:
            found.append((int(match.group(1)), str(path.with_suffix(""))))
    return [prefix for _, prefix in sorted(found)]


def _number(prefix: str) -> int:
    return int(Path(prefix).name.rsplit("-", 1)[1])


def _committed(directory: Path) -> Optional[List[str]]:
    """The state file's checkpoints, oldest first; None when it is missing or malformed."""
    import tensorflow as tf

    if not (directory / STATE).exists():
        return None
    try:
        state = tf.train.get_checkpoint_state(str(directory))
    except Exception as err:  # text-proto parse errors come out as ValueError and others
        log.warning("%s: unreadable checkpoint state file (%s); rebuilt from the ckpt-* files",
                    directory / STATE, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    if state is None or not state.model_checkpoint_path:  # TF returns None for an unparsable file
        log.warning("%s: unreadable checkpoint state file (no checkpoint path in it); rebuilt from the "
                    "ckpt-* files", directory / STATE)
        return None
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    return [str(directory / Path(p).name) for p in paths]


def open_manager(ckpt, directory, max_to_keep: int):
    """``tf.train.CheckpointManager`` on ``directory``, its state file repaired if needed.

    Returns ``(manager, candidates)``: candidates to restore from, newest first (the
    state file's when it reads, with older ``ckpt-*`` files it no longer lists; otherwise
    every ``ckpt-*`` on disk).
    """
    import tensorflow as tf

    directory = Path(directory)
    committed = _committed(directory)
    if committed is None:
        candidates = on_disk(directory)
        if candidates or (directory / STATE).exists():
            (directory / STATE).unlink(missing_ok=True)
            if candidates:
                tf.compat.v1.train.update_checkpoint_state(str(directory), candidates[-1],
                                                          all_model_checkpoint_paths=candidates)
    else:  # the committed ones, then older files the state file no longer lists (newest first below)
        newest = _number(committed[-1])
        candidates = sorted(set(committed) | {p for p in on_disk(directory) if _number(p) < newest}, key=_number)
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=max_to_keep)
    return manager, candidates[::-1]


def restore_newest(ckpt, candidates) -> Optional[str]:
    """Restore the first of ``candidates`` that reads completely; returns it (or None).

    Every failed attempt is a warning naming the checkpoint; UserError when none reads.
    A successful restore sets every variable (``assert_existing_objects_matched``), so
    nothing of a failed attempt survives it.
    """
    for prefix in candidates:
        try:
            ckpt.restore(prefix).assert_existing_objects_matched()
        except Exception as err:  # truncated/garbled files raise IndexError, DataLossError, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it",
                        prefix, type(err).__name__, first[:200])
            continue
        return prefix
    if candidates:  # variables may hold parts of a failed attempt: never train on from them
        raise UserError(f"{Path(candidates[0]).parent}: none of the {len(candidates)} checkpoints reads; "
                        "expected at least one intact ckpt-N (remove the folder to start afresh)")
    return None
