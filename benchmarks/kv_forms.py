"""Perplexity of KV-cache forms of fused attention on one dense decoder bundle (choices made on the dev split).

    python -m benchmarks.kv_forms DENSE_BUNDLE [--calib-windows 16] [--windows 8] [--text dev] [--json OUT]

Each form rewrites the bundle's fp32 graph with :func:`fuse_group_query_attention` (one GroupQueryAttention
per layer), calibrated once on ``--calib-windows`` × 512 tokens of wiki_calib (post-RoPE moments in ONNX
Runtime), and is scored by perplexity on ``--windows`` × 512 tokens of ``--text`` (``dev``: the last windows
of wiki_calib, never calibrated on; or a corpus name such as wiki_eval for reporting). Forms:

- ``dense``: the fp32 cache (the reference of the ratios);
- ``dense-int8`` / ``dense-int4``: the dense cache quantized with static per-channel scales (MSE clip);
- ``latent`` rows: absorbed post-RoPE latents (``groups`` per layer, ``rank`` per group or a ``budget``
  allocated across layers), float or at ``bits``;
- ``key-only`` / ``value-only``: one operand at reduced rank, the other at full rank (diagnostics).

Weights stay fp32, so each row isolates the cache. Writes one JSON with every row and the settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._output import emit_json

DEFAULT_FORMS = [
    {"form": "dense"},
    {"form": "dense", "bits": 8},
    {"form": "dense", "bits": 4},
    {"form": "latent", "groups": 3, "rank": 64, "bits": 4},
    {"form": "latent", "groups": 3, "budget": 0.5, "bits": 8},
    {"form": "latent", "groups": 1, "budget": 0.5, "bits": 8},
    {"form": "latent", "groups": 3, "rank": 48},
    {"form": "latent", "groups": 3, "rank": 48, "bits": 4},
    {"form": "latent", "groups": 1, "rank": 144},
    {"form": "key-only", "groups": 3, "rank": 48},
    {"form": "value-only", "groups": 3, "rank": 48},
]


def _layers(stats: list[Any], spec: dict[str, Any]) -> dict[int, Any] | None:
    from qsvd_export.compress.latent_factors import allocate_ranks, channel_scales, fit_latent
    from qsvd_export.latent_layout import dense_quantized

    bits = spec.get("bits")
    if spec["form"] == "dense":
        if bits is None:
            return None
        return {i: dense_quantized(s.kv_heads, s.head_dim, *(channel_scales(np.concatenate(rows), bits)
                                                             .reshape(s.kv_heads, s.head_dim)
                                                             for rows in (s.key_rows, s.value_rows)), bits)
                for i, s in enumerate(stats)}
    groups = spec["groups"]
    if spec["form"] in ("key-only", "value-only"):  # full rank, one operand's latent truncated
        layers = {}
        for i, s in enumerate(stats):
            layer = fit_latent(s, groups, s.kv_heads // groups * s.head_dim, bits=None)
            name = "key_down" if spec["form"] == "key-only" else "value_down"
            down = getattr(layer, name).copy()
            down[:, spec["rank"]:, :] = 0.0
            layers[i] = replace(layer, **{name: down})
        return layers
    ranks = (allocate_ranks(stats, groups, spec["budget"]) if "budget" in spec else [spec["rank"]] * len(stats))
    return {i: fit_latent(s, groups, r, bits) for i, (s, r) in enumerate(zip(stats, ranks))}


def _score(dense: Path, layers: dict[int, Any] | None, rows: np.ndarray, tmp: Path) -> tuple[float, int]:
    """(perplexity, cache bytes per token) of the fused graph with ``layers``."""
    import onnx_ir as ir

    from qsvd_export.bundle import load_bundle_config
    from qsvd_export.export import cache_layout_from_graph
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes.group_query_attention import fuse_group_query_attention
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

    out = tmp / "form"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(dense, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = load_onnx(dense / "model.onnx")
    fuse_group_query_attention(model, layers)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    config = json.loads((out / "qsvd_config.json").read_text())
    config["cache"] = [asdict(layer) for layer in cache_layout_from_graph(model)]
    (out / "qsvd_config.json").write_text(json.dumps(config))
    ppl = perplexity(DecoderRunner(out).window_nlls(rows))
    return ppl, load_bundle_config(out).kv_bytes_per_token()


def main(argv: list[str] | None = None) -> int:
    from qsvd_export.bundle import bundle_tokenizer
    from qsvd_export.compress.attention_stats import attention_statistics
    from qsvd_export.data import dev_windows, read_text, token_windows
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes.find_attention import find_attention
    from qsvd_export.passes.group_query_attention import match_fusable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path, help="a dense fp32 decoder bundle (qsvd-export export MODEL)")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--text", default="dev", help="dev (the last windows of wiki_calib) or a corpus name")
    parser.add_argument("--forms", type=json.loads, default=DEFAULT_FORMS, help="JSON list of form specs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tokenizer = bundle_tokenizer(args.dense)
    calib = token_windows(tokenizer, read_text("wiki_calib"), 512, args.calib_windows, source="wiki_calib")
    if args.text == "dev":  # token_windows above refuses calibration windows that reach it
        rows = dev_windows(tokenizer, args.windows)
    else:
        rows = token_windows(tokenizer, read_text(args.text), 512, args.windows, source=args.text)
    model = load_onnx(args.dense / "model.onnx")
    blocks = [b for b in find_attention(model).blocks if match_fusable(b)[0] is None]
    stats = attention_statistics(args.dense / "model.onnx", blocks, calib)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.forms:
            ppl, kv = _score(args.dense, _layers(stats, spec), rows, Path(tmp))
            results.append({**spec, "perplexity": round(ppl, 4), "kv_bytes_per_token": kv})
            base = results[0]["perplexity"]
            print(f"{json.dumps(spec)}: ppl {ppl:.3f} ({ppl / base:.3f}x), KV {kv} B/token", file=sys.stderr, flush=True)
    for row in results:
        row["ratio_to_first"] = round(row["perplexity"] / results[0]["perplexity"], 4)
    emit_json({"bundle": str(args.dense), "text": args.text, "windows": int(len(rows)), "length": 512,
               "calib_windows": args.calib_windows, "weights": "fp32", "rows": results}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
