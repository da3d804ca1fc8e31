"""The ``stemnet`` command: one module per group of user tasks.

``app`` holds the group and :func:`main`; each other module adds its sub-commands to it:
``info``, ``config`` (list/copy/show/validate/match), ``model`` (summary), ``data``
(simulate, inspect, stage), ``train`` (train, evaluate), ``scaling`` (scaling, timeline),
``reconstruct`` (reconstruct, calibrate), ``jobs`` (submit, launch), ``bench``, ``demo``.
Library code raises :class:`stemnet.errors.UserError` naming its arguments; the wording
in terms of command-line options is done here.
"""

from stemnet.cli.app import cli, main
from stemnet.cli import bench, config, data, demo, info, jobs, model, reconstruct, scaling, train  # noqa: F401  (register)

__all__ = ["cli", "main"]
