#!/usr/bin/env python3
"""Greedy tokens and decode tok/s of a decoder bundle: the project's loop vs onnxruntime-genai in another venv.

    .venv/bin/python scripts/genai_compare.py BUNDLE --genai-python /path/to/genai-venv/bin/python [--runs 3]

The genai side runs ``samples/genai_chat.py --print-ids`` in that venv (onnxruntime-genai alone). Prints one JSON
line: whether the chat-template prompt ids and the new ids agree, and the per-run decode tok/s of each (tokens
after the first, whose time includes the prefill)."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from qsvd_export import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--genai-python", required=True)
    parser.add_argument("--prompt", default="Tell me three facts about Paris, one per line.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    ids = bundle.encode(args.prompt)
    ours, theirs = [], []
    for _ in range(args.runs):
        new, first = [], 0.0
        for token in bundle.stream_ids(ids, args.max_new_tokens):
            new.append(token)
            first = first or time.perf_counter()
        ours.append(round((len(new) - 1) / (time.perf_counter() - first), 2))
        run = subprocess.run([args.genai_python, str(ROOT / "samples" / "genai_chat.py"), str(args.bundle),
                              "--prompt", args.prompt, "--max-new-tokens", str(args.max_new_tokens), "--print-ids"],
                             capture_output=True, text=True, check=True)
        genai = json.loads(run.stdout.strip().splitlines()[-1])
        theirs.append(genai["decode_tokens_per_s"])
    print(json.dumps({"bundle": str(args.bundle), "new_tokens": len(new), "prompt_ids_match": genai["prompt_ids"] == ids,
                      "new_ids_match": genai["new_ids"] == new, "project_tok_s": sorted(ours),
                      "genai_tok_s": sorted(theirs)}))


if __name__ == "__main__":
    main()
