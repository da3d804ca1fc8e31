"""The one exception family users see: a one-line message naming what is at fault.

Library code names a bad argument by its Python name, marked with :func:`argument`
(``UserError(f"{argument('nodes')} 0: expected a positive number of nodes")``): ``str()``
shows the name (``nodes 0: ...``), and the CLI words it as its option with
:meth:`UserError.worded` (``--nodes 0: ...``). The library never spells a flag.
"""

from __future__ import annotations

from typing import Callable

_MARK = "\x1f"  # unit separator: never in a real message


def argument(name: str) -> str:
    """``name``, an argument of the library call, marked for the CLI to word as its option."""
    return f"{_MARK}{name}{_MARK}"


class UserError(Exception):
    """Bad input (file, key, argument): the CLI prints ``error: <message>`` and exits 2."""

    def __init__(self, message: object = "", *rest):
        self.marked = str(message)
        super().__init__(self.marked.replace(_MARK, ""), *rest)

    def worded(self, word: Callable[[str], str]) -> str:
        """The message with each marked argument name replaced by ``word(name)``."""
        parts = self.marked.split(_MARK)
        return "".join(word(p) if i % 2 else p for i, p in enumerate(parts))
