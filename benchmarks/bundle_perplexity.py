"""Perplexity and KV bytes of decoder bundles on one text, each ratio against the first bundle (one run).

    python -m benchmarks.bundle_perplexity REF_BUNDLE BUNDLE... [--text dev|wiki_eval|news_eval] [--windows 8]
                                          [--length 512] [--json OUT]

``dev`` is the decoder dev split (the last 512-token windows of wiki_calib, which calibration never reads):
settings are chosen there, and reported on wiki_eval / news_eval. Windows are scored with one prefill each
(EVAL.md, ``DecoderRunner.window_nlls``) on the CPU EP. Bundles must share a tokenizer (the first's is used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks._output import emit_json


def main(argv: list[str] | None = None) -> int:
    from qsvd_export.bundle import bundle_tokenizer, load_bundle_config
    from qsvd_export.data import dev_windows, read_text, token_windows
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity
    from qsvd_export.runtimes.sessions import SessionOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", type=Path, nargs="+", help="decoder bundles; the first is the reference")
    parser.add_argument("--text", default="dev", help="dev (the last windows of wiki_calib) or a corpus name")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512,
                        help="tokens per window (EVAL.md: 512; longer windows test long-context attention)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tokenizer = bundle_tokenizer(args.bundles[0])
    if args.text == "dev":
        rows = dev_windows(tokenizer, args.windows, args.length)
    else:
        rows = token_windows(tokenizer, read_text(args.text), args.length, args.windows, source=args.text)
    results = []
    for bundle in args.bundles:
        runner = DecoderRunner(bundle, options=SessionOptions(threads=args.threads))
        ppl = perplexity(runner.window_nlls(rows))
        report = json.loads((bundle / "report.json").read_text()) if (bundle / "report.json").is_file() else {}
        target = report.get("target") or {}
        results.append({"bundle": str(bundle), "perplexity": round(ppl, 4),
                        "kv_bytes_per_token": load_bundle_config(bundle).kv_bytes_per_token(),
                        "bits": target.get("bits", "fp32"),
                        "cache_dtypes": sorted({t.dtype for la in runner.config.cache for t in la.tensors})})
        print(f"{bundle}: ppl {ppl:.3f} ({ppl / results[0]['perplexity']:.4f}x)", file=sys.stderr, flush=True)
    for row in results:
        row["ratio_to_first"] = round(row["perplexity"] / results[0]["perplexity"], 4)
    emit_json({"text": args.text, "windows": int(len(rows)), "length": int(rows.shape[1]), "rows": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
