"""Perplexity of an npu bundle on the QNN HTP backend itself vs the CPU EP, on the same windows.

    python -m benchmarks.htp_perplexity NPU_BUNDLE [--windows 4] [--dense DENSE_BUNDLE]

NPU_BUNDLE is a ``--target npu`` bundle; its ``--precompile`` context binaries are used when present,
otherwise HTP compiles the QDQ graphs (CPU fallback disabled either way). Windows are the first
``--windows`` prefill-length windows of wiki_eval, each one prefill call. Prints one JSON line. The HTP
simulator of onnxruntime-qnn takes about a minute per 128-token window on a 2-core VM. ``--dense``: also
the perplexity of the dynamic fp32 bundle the npu bundle was built from, on the same windows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qsvd_export.bundle import bundle_tokenizer, load_bundle_config
from qsvd_export.data import read_text, token_windows
from qsvd_export.targets.npu.options import CONTEXT_FILES, GRAPH_FILES
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.metrics import perplexity
from qsvd_export.runtimes.sessions import SessionOptions
from qsvd_export.runtimes.static_decode import StaticDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--dense", type=Path, default=None, help="the fp32 bundle it was built from")
    args = parser.parse_args()
    config = load_bundle_config(args.bundle)
    if not config.static_shapes:
        parser.error(f"{args.bundle} is not an npu bundle (no static_shapes in its config)")
    shapes = config.static_shapes
    files = CONTEXT_FILES if (args.bundle / CONTEXT_FILES["prefill"]).exists() else GRAPH_FILES
    rows = token_windows(bundle_tokenizer(args.bundle), read_text("wiki_eval"), shapes["prefill_length"], args.windows,
                         source="wiki_eval")
    geometry = (config.cache, shapes["context_length"], shapes["prefill_length"])
    cpu = StaticDecoder.from_files(*(args.bundle / GRAPH_FILES[r] for r in GRAPH_FILES), *geometry)
    htp = StaticDecoder.from_files(*(args.bundle / files[r] for r in GRAPH_FILES), *geometry, "npu",
                                   SessionOptions(strict=True, htp_arch=shapes["htp_arch"]))
    start = time.perf_counter()
    htp_nlls = htp.window_nlls(rows)
    htp_s = time.perf_counter() - start
    cpu_nlls = cpu.window_nlls(rows)
    dense = {} if args.dense is None else {"dense_ppl": round(perplexity(DecoderRunner(args.dense).window_nlls(rows)), 3)}
    print(json.dumps({**dense, "bundle": str(args.bundle), "windows": f"{args.windows} x {shapes['prefill_length']} wiki_eval",
                      "graphs": "context binaries" if files is CONTEXT_FILES else "QDQ graphs compiled by QNN",
                      "htp_ppl": round(perplexity(htp_nlls), 3), "cpu_ep_ppl": round(perplexity(cpu_nlls), 3),
                      "htp_s": round(htp_s, 1)}))


if __name__ == "__main__":
    main()
