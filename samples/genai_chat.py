#!/usr/bin/env python3
"""Chat with a qsvd-export bundle through onnxruntime-genai: what an app team copies.

    pip install onnxruntime-genai==0.18.0          # tested version; nothing else is needed
    python samples/genai_chat.py BUNDLE                       # interactive: one user turn per line, empty line quits
    python samples/genai_chat.py BUNDLE --prompt "What is the capital of France?" [--max-new-tokens 64]
    python samples/genai_chat.py BUNDLE --ids 1,2,3 --print-ids   # token ids in, token ids out (no tokenizer)

The bundle's ``genai_config.json`` (written by qsvd-export wherever genai can run the bundle; ``report.json`` →
``runtimes.onnxruntime_genai`` says why not elsewhere) names the graph, the cache tensors and the greedy
search settings, and for graphs without fused attention ``search.chunk_size``: genai itself then feeds a long
prompt through the cache in parts of that many tokens. The model's chat template (``tokenizer_config.json`` →
``chat_template``) formats every turn; the conversation is kept, so each answer sees the earlier turns. Output
streams token by token. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnxruntime_genai as og


def fail(message: str) -> None:
    print(f"genai_chat: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def open_model(bundle: Path) -> og.Model:
    if not (bundle / "genai_config.json").is_file():
        reason = ""
        report = bundle / "report.json"
        if report.is_file():
            reason = json.loads(report.read_text()).get("runtimes", {}).get("onnxruntime_genai", {}).get("reason", "")
        fail(f"{bundle} has no genai_config.json" + (f": {reason}" if reason else ""))
    return og.Model(str(bundle))


def generate(model: og.Model, prompt_ids: list[int], max_new_tokens: int, on_token=None) -> tuple[list[int], float]:
    """Greedy new ids after ``prompt_ids`` (stops at an EOS id or ``max_new_tokens``), and decode tokens/s
    (every token after the first, whose time includes the prefill)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    new: list[int] = []
    first = None
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
        if first is None:
            first = time.perf_counter()
        if on_token is not None:
            on_token(new[-1])
    elapsed = time.perf_counter() - first if first is not None else 0.0
    return new, (len(new) - 1) / elapsed if len(new) > 1 and elapsed > 0 else 0.0


def chat_ids(tokenizer: og.Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The conversation so far, formatted by the model's chat template, as token ids."""
    text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    return [int(i) for i in tokenizer.encode(text)]


def turn(model: og.Model, tokenizer: og.Tokenizer, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """One assistant turn, streamed to stdout; appended to ``messages``."""
    stream = tokenizer.create_stream()
    new, _ = generate(model, chat_ids(tokenizer, messages), max_new_tokens,
                      lambda token: print(stream.decode(token), end="", flush=True))
    print()
    answer = tokenizer.decode(new)
    messages.append({"role": "assistant", "content": answer})
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompt", help="one user turn, then exit (default: interactive)")
    parser.add_argument("--ids", help="comma-separated prompt token ids (no tokenizer, no chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--print-ids", action="store_true", help="print prompt_ids, new_ids and decode tok/s as JSON")
    args = parser.parse_args(argv)
    if not args.bundle.is_dir():
        fail(f"{args.bundle}: bundle folder not found")
    if args.max_new_tokens < 1:
        fail("--max-new-tokens must be at least 1")
    model = open_model(args.bundle)
    if args.ids is not None:
        try:
            prompt_ids = [int(i) for i in args.ids.split(",")]
        except ValueError:
            fail(f"--ids must be comma-separated integers, got {args.ids!r}")
        new, rate = generate(model, prompt_ids, args.max_new_tokens)
        print(json.dumps({"prompt_ids": prompt_ids, "new_ids": new, "decode_tokens_per_s": round(rate, 2)}))
        return 0
    tokenizer = og.Tokenizer(model)
    messages: list[dict[str, str]] = []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        if args.print_ids:
            prompt_ids = chat_ids(tokenizer, messages)
            new, rate = generate(model, prompt_ids, args.max_new_tokens)
            print(json.dumps({"prompt_ids": prompt_ids, "new_ids": new, "text": tokenizer.decode(new),
                              "decode_tokens_per_s": round(rate, 2)}))
        else:
            turn(model, tokenizer, messages, args.max_new_tokens)
        return 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        turn(model, tokenizer, messages, args.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
