"""stemnet: recover 3-D atomic distortions and the projected potential from STEM data.

Simulated training data (``simulation``), sharded LMDB storage (``stemnet.shards``),
an FC-DenseNet encoder-decoder trained data-parallel with Horovod, and reconstruction
of experimental micrographs. See README.md.
"""

__version__ = "0.1.0"
