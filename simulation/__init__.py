"""Dataset generation: perovskite specimens, abTEM multislice, labels, sharded writer."""

from stemnet import __version__

__all__ = ["__version__"]
