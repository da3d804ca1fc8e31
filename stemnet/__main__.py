"""``python -m stemnet``: the ``stemnet`` command."""

import sys

from stemnet.cli import main

if __name__ == "__main__":  # not on import (pkgutil.walk_packages imports every module)
    sys.exit(main())
