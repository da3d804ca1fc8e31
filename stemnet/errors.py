"""The one exception family users see: a one-line message naming what is at fault."""


class UserError(Exception):
    """Bad input (file, key, option): the CLI prints ``error: <message>`` and exits 2."""
