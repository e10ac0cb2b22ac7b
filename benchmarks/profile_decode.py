"""Where decode time goes: ONNX Runtime kernel time of cached decode steps, grouped by what the node does.

    python -m benchmarks.profile_decode BUNDLE [--context 2048] [--steps 16] [--threads 2]

Prefills ``--context`` random tokens, then profiles ``--steps`` single-token decode steps (the prefill runs,
chunked or not, and ``--warmup`` steps are excluded from the totals). Nodes our passes created are named
``qsvd/layerN/<pass>/...``; they are grouped by ``<pass>/<part>`` (``latent_kv/k`` = key rebuilt from the latent
cache incl. RoPE, ``fold_value`` = attention-weighted latent and the folded V/O matmul, ``kv`` = down-projection).
Every other node is grouped by operator type. Prints ms per decode step and share per group.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np

_OURS = re.compile(r"^qsvd/layer\d+/([^/_]+(?:_[a-z]+)?)(?:/([a-z]+))?")


def node_group(name: str, op: str) -> str:
    """``latent_kv/k:Mul`` for ``qsvd/layer3/latent_kv/k/Mul_12``; ``op:MatMul`` for nodes not ours."""
    match = _OURS.match(name)
    if match:
        return "/".join(part for part in match.groups() if part) + f":{op}"
    return f"op:{op}"


def profile(bundle: Path, context: int, steps: int, threads: int, warmup: int = 2) -> dict:
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.sessions import SessionOptions

    with tempfile.TemporaryDirectory() as tmp:
        options = SessionOptions(threads=threads, profile_prefix=str(Path(tmp) / "decode"))
        runner = DecoderRunner(bundle, "cpu", options)
        vocab = int(runner.config.model_config.get("vocab_size", 256))
        prompt = np.random.default_rng(context).integers(0, vocab, (1, context))
        logits, cache = runner.prefill(prompt)
        length = context
        for _ in range(warmup + steps):
            token = np.asarray([[int(np.argmax(logits[0, -1]))]])
            logits, cache = runner.step(token, np.ones((1, length + 1)), np.asarray([[length]]), cache)
            length += 1
        trace = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # The prefill (one run, or one per chunk where attention is not fused) and the warm-up steps are left out.
    decode_runs = runs[-steps:]
    start = decode_runs[0]["ts"]
    totals: collections.Counter[str] = collections.Counter()
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < start:
            continue
        name = event["name"][: -len("_kernel_time")]
        totals[node_group(name, event.get("args", {}).get("op_name", "?"))] += event["dur"]
    run_us = sum(r["dur"] for r in decode_runs)
    return {"bundle": str(bundle), "context": context, "steps": len(decode_runs),
            "ms_per_step": run_us / len(decode_runs) / 1000,
            "groups_ms_per_step": {k: v / len(decode_runs) / 1000 for k, v in totals.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    result = profile(args.bundle, args.context, args.steps, args.threads, args.warmup)
    print(json.dumps(result))
    total = result["ms_per_step"]
    print(f"{args.bundle.name}: {total:.1f} ms per decode step at context {args.context} ({result['steps']} steps)")
    for group, ms in list(result["groups_ms_per_step"].items())[: args.top]:
        print(f"  {group:28s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
