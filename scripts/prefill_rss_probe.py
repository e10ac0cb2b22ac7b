"""Peak resident memory of a decoder bundle across repeated prefills (ONNX Runtime's arena growth).

    python scripts/prefill_rss_probe.py BUNDLE [BUNDLE ...] [--lengths 512 512 512 2048 2048 2048] [--steps 8]
        [--prefill-chunk N] [--runtime runner|genai] [--json OUT]

Per bundle, in its own process: for each length, a prefill of random tokens then ``--steps`` decode steps; prints
the peak RSS (MB) after each, so arena growth from one prefill to the next shows, and each prefill's seconds.
``--prefill-chunk``: prompt tokens per forward (default "auto": DecoderRunner's choice, or for genai the bundle's
``genai_config.json`` → ``search.chunk_size``; 0 = the whole prompt in one forward). ``--runtime genai``:
onnxruntime-genai's generator, the prompt appended at once (genai chunks it), an explicit chunk set by a config
overlay.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

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


def probe_genai(bundle: str, lengths: list[int], steps: int, chunk: str) -> dict[str, list]:
    import onnxruntime_genai as og

    from qsvd_export.bundle import load_bundle_config

    size = int(chunk) if chunk != "auto" else \
        json.loads((Path(bundle) / "genai_config.json").read_text())["search"].get("chunk_size", 0)
    settings = og.Config(bundle)
    settings.overlay(json.dumps({"search": {"chunk_size": size}}))  # the one value reported below
    model = og.Model(settings)
    vocab = int(load_bundle_config(bundle).model_config.get("vocab_size", 256))
    peaks, seconds = [], []
    for length in lengths:
        prompt = np.random.default_rng(length).integers(0, vocab, length).astype(np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + steps, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        seconds.append(round(time.perf_counter() - start, 2))
        for _ in range(steps):
            generator.generate_next_token()
        del generator
        peaks.append(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return {"peak_rss_mb": peaks, "prefill_s": seconds, "chunk": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 512, 512, 2048, 2048, 2048])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill-chunk", default="auto", help="tokens per forward, 0 = one forward (default: "
                        "DecoderRunner's choice)")
    parser.add_argument("--runtime", choices=["runner", "genai"], default="runner")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure = probe_genai if args.runtime == "genai" else probe
        print(json.dumps(measure(args.bundles[0], args.lengths, args.steps, args.prefill_chunk)))
        return
    rows = []
    for bundle in args.bundles:
        worker = subprocess.run([sys.executable, __file__, bundle, "--worker", "--steps", str(args.steps),
                                 "--prefill-chunk", str(args.prefill_chunk), "--runtime", args.runtime,
                                 "--lengths", *map(str, args.lengths)], capture_output=True, text=True)
        if worker.returncode != 0:  # e.g. a length past the model's context
            last = (worker.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"prefill_rss_probe: {bundle}: the worker failed: {last}")
        out = worker.stdout
        rows.append({"bundle": bundle, "runtime": args.runtime, "lengths": args.lengths,
                     "prefill_chunk": args.prefill_chunk,
                     **json.loads(out.splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "reproduce": "python scripts/prefill_rss_probe.py " + " ".join(sys.argv[1:])},
                      f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
