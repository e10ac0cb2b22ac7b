"""The four decode-speed bundles of the README's "KV cache of fused attention" table.

    python scripts/kv_speed_bundles.py DENSE_BUNDLE OUT_DIR

From a dense fp32 decoder bundle: the cpu policy's w4a8 weights (no smoothing) with fused GroupQueryAttention
reading an fp32, int8 or int4 cache, or the absorbed post-RoPE latent at kv=0.5 (int8, one group per KV head),
calibrated on 6 × 512 tokens of wiki_calib. Only speed is meant to be compared between them.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qsvd_export.bundle import bundle_tokenizer
from qsvd_export.compress.attention_stats import attention_statistics
from qsvd_export.compress.latent_factors import allocate_ranks, channel_scales, fit_latent
from qsvd_export.data import read_text, token_windows
from qsvd_export.export import cache_layout_from_graph
from qsvd_export.latent_layout import dense_quantized
from qsvd_export.onnx_io import load_onnx
from qsvd_export.passes.find_attention import find_attention
from qsvd_export.passes.group_query_attention import match_fusable
from qsvd_export.quant.presets import parse_bits
from qsvd_export.targets import policy_for


def main(dense: Path, out: Path) -> None:
    windows = token_windows(bundle_tokenizer(dense), read_text("wiki_calib"), 512, 6)
    blocks = [b for b in find_attention(load_onnx(dense / "model.onnx")).blocks if match_fusable(b)[0] is None]
    stats = attention_statistics(dense / "model.onnx", blocks, windows)

    def quantized(bits: int) -> dict:
        return {i: dense_quantized(s.kv_heads, s.head_dim, *(channel_scales(np.concatenate(rows), bits)
                                                             .reshape(s.kv_heads, s.head_dim)
                                                             for rows in (s.key_rows, s.value_rows)), bits)
                for i, s in enumerate(stats)}

    ranks = allocate_ranks(stats, 3, 0.5)
    forms = {"w4a8-f32cache": None, "w4a8-int8cache": quantized(8), "w4a8-int4cache": quantized(4),
             "w4a8-latent-g3-int8": {i: fit_latent(s, 3, r, 8) for i, (s, r) in enumerate(zip(stats, ranks))}}
    for name, latent in forms.items():
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(dense, folder, ignore=shutil.ignore_patterns("model.onnx*"))
        model = load_onnx(dense / "model.onnx")
        policy_for("cpu").quantize(model, parse_bits("w4a8"), True, latent)
        ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
        config = json.loads((folder / "qsvd_config.json").read_text())
        config["cache"] = [asdict(layer) for layer in cache_layout_from_graph(model)]
        (folder / "qsvd_config.json").write_text(json.dumps(config))
        print(folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
