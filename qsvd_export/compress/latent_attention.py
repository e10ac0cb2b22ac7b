"""The cpu target's KV budget: absorbed latent attention planned on the graph itself (no torch model).

``plan_latent_attention`` measures the post-RoPE query/key/value moments of every attention block that
GroupQueryAttention can take over (:func:`~qsvd_export.passes.group_query_attention.match_fusable`) by
running the graph in ONNX Runtime on calibration windows, allocates per-block ranks under the KV budget
and fits the factors (:mod:`qsvd_export.compress.latent_factors`). The result feeds
:func:`~qsvd_export.passes.group_query_attention.fuse_group_query_attention`.

Decode cost per cached token and block: ``2·G·r`` cached values (bytes at 8 bits) and ``2·H·r``
multiply-adds, against dense's ``2·KVH·D`` values and ``2·H·D`` multiply-adds. ``groups`` therefore
trades quality for arithmetic at equal bytes: one group (a latent shared by all KV heads) lets the rank
follow the data across heads but costs ``KVH``× the multiply-adds of per-head groups.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qsvd_export.compress.attention_stats import attention_statistics
from qsvd_export.compress.latent_factors import allocate_ranks, channel_scales, fit_latent
from qsvd_export.errors import UsageError
from qsvd_export.latent_layout import LatentLayer, dense_quantized
from qsvd_export.passes.find_attention import find_attention
from qsvd_export.passes.group_query_attention import match_fusable


def plan_latent_attention(model: ir.Model, windows: np.ndarray, budget: float | None, groups: int | None = None,
                          bits: int | None = 8, step: int = 8) -> tuple[dict[int, LatentLayer], dict[str, Any]]:
    """Latent layouts of ``model``'s fusable attention blocks (keys: their order among fusable blocks) for a
    KV budget (cached values ÷ dense cached values, both at the cache's element size), with the report.

    ``groups``: latent groups per block (default: one group per KV head, the decode cost of dense
    attention at half the budget's arithmetic); ``bits``: 8 for an int8 cache, None for float.
    ``budget`` None: the dense cache itself at ``bits`` (identity factors, calibrated int8 scales)."""
    blocks = [b for b in find_attention(model).blocks if match_fusable(b)[0] is None]
    if not blocks:
        raise UsageError("latent attention: no attention block GroupQueryAttention can take (needs dense K/V "
                         "cache Concats, a constant score scale and one additive mask)")
    kv_heads = {int(b.k_cache.new.shape[1]) for b in blocks}  # type: ignore[union-attr,index,arg-type]
    chosen = groups if groups is not None else min(kv_heads)
    if any(h % chosen for h in kv_heads):
        raise UsageError(f"--latent-groups {chosen} does not divide the KV heads ({sorted(kv_heads)})")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        ir.save(model, probe, external_data="probe.onnx.data")
        stats = attention_statistics(probe, blocks, windows)  # values are found by name on the saved copy
    if budget is None:
        if bits is None:
            raise UsageError("a dense cache without a KV budget is already float: nothing to do")
        chosen, ranks = min(kv_heads), [s.head_dim for s in stats]
        layers = {i: dense_quantized(s.kv_heads, s.head_dim, *(channel_scales(np.concatenate(rows), bits)
                                                          .reshape(s.kv_heads, s.head_dim)
                                                          for rows in (s.key_rows, s.value_rows)), bits)
                  for i, s in enumerate(stats)}
    else:
        ranks = allocate_ranks(stats, chosen, budget, step=step, minimum=step)
        layers = {i: fit_latent(s, chosen, r, bits) for i, (s, r) in enumerate(zip(stats, ranks))}
    dense_width = sum(2 * s.kv_heads * s.head_dim for s in stats)
    report = {
        "form": "dense cache" if budget is None else "absorbed post-RoPE latent, GroupQueryAttention over latent heads",
        "budget": budget,
        "groups": chosen, "ranks": ranks, "cache_bits": bits or 32,
        "cache_values_per_token": sum(layer.cache_width for layer in layers.values()),
        "cache_bytes_per_token": int(sum(layer.cache_bytes for layer in layers.values())),
        "dense_cache_values_per_token": dense_width,
        "calibration": {"windows": int(windows.shape[0]), "length": int(windows.shape[1])},
        "attention_macs_per_cached_token_vs_dense": round(
            sum(s.heads * 2 * r for s, r in zip(stats, ranks)) / sum(s.heads * 2 * s.head_dim for s in stats), 4),
        "scales": "static per latent channel (MSE clip on the calibration rows)" if bits else None,
    }
    return layers, report
