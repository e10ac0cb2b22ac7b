"""Peak resident memory of a decoder bundle across repeated prefills (ONNX Runtime's arena growth).

    python scripts/prefill_rss_probe.py BUNDLE [BUNDLE ...] [--lengths 512 512 512 2048 2048 2048] [--steps 8]

Per bundle, in its own process: for each length, a prefill of random tokens then ``--steps`` decode steps; prints
the peak RSS (MB) after each, so arena growth from one prefill to the next shows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np


def probe(bundle: str, lengths: list[int], steps: int) -> list[int]:
    from qsvd_export.runtimes.decode import DecoderRunner

    runner = DecoderRunner(bundle)
    vocab = int(runner.config.model_config.get("vocab_size", 256))
    peaks = []
    for length in lengths:
        logits, cache = runner.prefill(np.random.default_rng(length).integers(0, vocab, (1, length)))
        for t in range(length, length + steps):
            logits, cache = runner.step(np.asarray([[1]]), np.ones((1, t + 1)), np.asarray([[t]]), cache)
        peaks.append(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 512, 512, 2048, 2048, 2048])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(probe(args.bundles[0], args.lengths, args.steps)))
        return
    for bundle in args.bundles:
        out = subprocess.run([sys.executable, __file__, bundle, "--worker", "--steps", str(args.steps), "--lengths",
                              *map(str, args.lengths)], check=True, capture_output=True, text=True).stdout
        print(json.dumps({"bundle": bundle, "lengths": args.lengths, "peak_rss_mb": json.loads(out.splitlines()[-1])}))


if __name__ == "__main__":
    main()
