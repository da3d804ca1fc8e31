"""Benchmarks: ratios measured side by side in one run, on the same data.

Each function returns a dict (the ``--json`` payload) whose ``ratio_*`` keys are the
figures the README reports. Nothing here asserts a speed: tests do not time things.
One module per benchmark: :mod:`~stemnet.bench.data`, :mod:`~stemnet.bench.train`,
:mod:`~stemnet.bench.grouping`, :mod:`~stemnet.bench.simulate` (the only one that
imports ``simulation``, lazily). Submodules load on first use, so ``import
stemnet.bench`` stays light.
"""

from stemnet.bench.common import REPO, rate, shipped, write

_LAZY = {
    "bench_data": "stemnet.bench.data", "bench_data_pipeline": "stemnet.bench.data",
    "synthetic_dataset": "stemnet.bench.data", "bench_train": "stemnet.bench.train",
    "bench_grouping": "stemnet.bench.grouping", "bench_simulate": "stemnet.bench.simulate",
}

__all__ = ["REPO", "rate", "shipped", "write", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stemnet.bench' has no attribute {name!r}")
