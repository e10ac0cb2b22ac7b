"""Probe: the npu cache I/O with its static ranges widened by a factor (is clipping what the coded cache costs?).

    python scripts/npu_cache_range_probe.py FACTOR BUNDLE [benchmarks.npu_quality arguments]
    e.g. python scripts/npu_cache_range_probe.py 1.5 out/dense --kv-bits 16 --split dev --windows 8 --window-length 512
        --json results/npu_cache_io_dev_dense_kv16_range1.5.json

Runs ``benchmarks.npu_quality`` with :func:`qsvd_export.targets.npu.cache_io.cache_ranges` scaled by FACTOR.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    sys.path.insert(0, os.getcwd())
    import qsvd_export.targets.npu.cache_io as cache_io

    factor = float(sys.argv[1])
    measured = cache_io.cache_ranges
    cache_io.cache_ranges = lambda feeds, cache: {name: (low * factor, high * factor)  # noqa: E731
                                                   for name, (low, high) in measured(feeds, cache).items()}
    sys.argv = ["benchmarks.npu_quality", *sys.argv[2:]]
    runpy.run_module("benchmarks.npu_quality", run_name="__main__")


if __name__ == "__main__":
    main()
