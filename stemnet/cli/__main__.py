"""``python -m stemnet.cli``: the ``stemnet`` command."""

import sys

from stemnet.cli import main

sys.exit(main())
