"""One trainer per run folder: an exclusive ``flock`` on ``RUN/.lock``.

The kernel drops a ``flock`` when its process ends, however it ends (SIGKILL included),
so a lock left by a killed trainer is never stale: the next trainer simply gets it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from stemnet.errors import UserError, argument

LOCK = ".lock"


class RunLock:
    """Hold ``RUN/.lock`` exclusively for the life of the object (or ``with`` block).

    Raises
    ------
    UserError
        Another process holds the lock (its pid is named), or the folder cannot be made.
    """

    def __init__(self, run):
        self.path = Path(run) / LOCK
        self._fd = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{argument('out')} {self.path.parent}: cannot create the run folder ({err.strerror}); "
                            "expected a writable path") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise UserError(f"{self.path.parent}: another `stemnet train` (pid {holder}) is using this run "
                            f"folder; wait for it to end, or use another {argument('out')}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
