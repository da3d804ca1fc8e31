"""``python -m stemnet``: the ``stemnet`` command."""

import sys

from stemnet.cli import main

sys.exit(main())
