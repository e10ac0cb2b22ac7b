"""Chat quality of bundles against a dense bundle (EVAL.md "Chat quality"; logic in qsvd_export.chat_quality).

    python -m benchmarks.chat_quality DENSE_BUNDLE BUNDLE [BUNDLE ...] [--out FILE] [--target cpu]
        [--prompts N] [--qa N] [--reply-tokens 32] [--answer-tokens 24]

Prints one line per bundle (KL to dense and top-1 agreement on the chat prompts; QA answers of dense's
kept) and writes the full JSON (every reply and answer) to ``--out`` (default results/chat_quality.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from qsvd_export.chat_quality import ANSWER_TOKENS, CHAT_SET, REPLY_TOKENS, bundle_chat_quality, load_chat_set, summary_line
from qsvd_export.errors import QsvdError, UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chat_quality", description=__doc__.split("\n")[0])
    parser.add_argument("dense", type=Path, help="dense bundle (the reference)")
    parser.add_argument("bundles", type=Path, nargs="+", help="bundles to score against it")
    parser.add_argument("--out", type=Path, default=Path("results/chat_quality.json"))
    parser.add_argument("--target", default="cpu", help="execution target of every session (default cpu)")
    parser.add_argument("--set", type=Path, default=CHAT_SET, help="chat set JSON (default: the project's)")
    parser.add_argument("--prompts", type=int, default=None, help="use the first N chat prompts (quick checks)")
    parser.add_argument("--qa", type=int, default=None, help="use the first N QA items (quick checks)")
    parser.add_argument("--reply-tokens", type=int, default=REPLY_TOKENS)
    parser.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS)
    parser.add_argument("--raw", action="store_true", help="no chat template (tiny test bundles only)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    for flag in ("prompts", "qa", "reply_tokens", "answer_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    names = [path.name or str(path) for path in args.bundles]
    if len(set(names)) != len(names):
        raise UsageError(f"bundle folder names must differ (they name the rows): {', '.join(names)}")
    chat_set = load_chat_set(args.set)
    chat_set = replace(chat_set, prompts=chat_set.prompts[:args.prompts], qa=chat_set.qa[:args.qa])
    start = time.perf_counter()
    result = bundle_chat_quality(args.dense, dict(zip(names, args.bundles)), args.target, chat_set=chat_set,
                                 reply_tokens=args.reply_tokens, answer_tokens=args.answer_tokens, raw=args.raw)
    result["settings"].update(dense=str(args.dense), bundles={n: str(p) for n, p in zip(names, args.bundles)},
                              target=args.target, seconds=round(time.perf_counter() - start, 1))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except QsvdError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"dense: {result['dense']['qa_correct']}/{result['dense']['qa_total']} QA answers correct")
    for name in result["bundles"]:
        print(f"{name}: {summary_line(result, name)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
