"""Peak resident memory of a decoder bundle across repeated prefills (ONNX Runtime's arena growth).

    python scripts/prefill_rss_probe.py BUNDLE [BUNDLE ...] [--lengths 512 512 512 2048 2048 2048] [--steps 8]
        [--prefill-chunk N] [--json OUT]

Per bundle, in its own process: for each length, a prefill of random tokens then ``--steps`` decode steps; prints
the peak RSS (MB) after each, so arena growth from one prefill to the next shows, and each prefill's seconds. ``--prefill-chunk``: prompt
tokens per forward (default: DecoderRunner's "auto"; 0 = the whole prompt in one forward).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def probe(bundle: str, lengths: list[int], steps: int, chunk: str) -> dict[str, list]:
    from qsvd_export.runtimes.decode import DecoderRunner

    runner = DecoderRunner(bundle, prefill_chunk="auto" if chunk == "auto" else int(chunk) or None)
    vocab = int(runner.config.model_config.get("vocab_size", 256))
    peaks, seconds = [], []
    for length in lengths:
        start = time.perf_counter()
        logits, cache = runner.prefill(np.random.default_rng(length).integers(0, vocab, (1, length)))
        seconds.append(round(time.perf_counter() - start, 2))
        for t in range(length, length + steps):
            logits, cache = runner.step(np.asarray([[1]]), np.ones((1, t + 1)), np.asarray([[t]]), cache)
        peaks.append(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return {"peak_rss_mb": peaks, "prefill_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 512, 512, 2048, 2048, 2048])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill-chunk", default="auto", help="tokens per forward, 0 = one forward (default: "
                        "DecoderRunner's choice)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(probe(args.bundles[0], args.lengths, args.steps, args.prefill_chunk)))
        return
    rows = []
    for bundle in args.bundles:
        out = subprocess.run([sys.executable, __file__, bundle, "--worker", "--steps", str(args.steps),
                              "--prefill-chunk", str(args.prefill_chunk), "--lengths", *map(str, args.lengths)],
                             check=True, capture_output=True, text=True).stdout
        rows.append({"bundle": bundle, "lengths": args.lengths, "prefill_chunk": args.prefill_chunk,
                     **json.loads(out.splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "reproduce": "python scripts/prefill_rss_probe.py " + " ".join(sys.argv[1:])},
                      f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
