"""stemnet: recover 3-D atomic distortions and the projected potential from STEM data.

Simulated training data (``simulation``), sharded LMDB storage (``stemnet.shards``),
an FC-DenseNet encoder-decoder trained data-parallel with Horovod or tf.distribute, and
reconstruction of experimental micrographs. See README.md.
"""

import importlib.util
import os

# TensorFlow >= 2.16 makes tf.keras Keras 3 unless this is set before it is imported; the
# code is Keras 2 (tf_keras, installed by the modern stack), which Keras 3 cannot replace
# under tf.distribute (see README, stacks). TensorFlow 2.15 has no tf_keras and must not
# get it: its tf.keras would then look for tf_keras.
if importlib.util.find_spec("tf_keras") is not None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"
