"""Second moments of the post-RoPE attention operands, measured by running an ONNX graph in ONNX Runtime.

For every attention block with a dense K/V cache the graph's own values are exposed as outputs: the query
entering QKᵀ (RoPE applied) [B, H, S, D], and the new key and value rows entering the cache Concats
[B, KVH, S, D] (keys RoPE-rotated). Accumulated over calibration windows (float64):

- ``key`` / ``value``: Σ kkᵀ and Σ vvᵀ over tokens, [KVH·D, KVH·D] (heads concatenated, head-major);
- ``query``: Σ qqᵀ of the query heads that read each KV head, [KVH, D, D];
- ``key_rows`` / ``value_rows``: a seeded sample of token rows [n, KVH·D] (for latent ranges);
- ``value_metric``: Σ W_h W_hᵀ over the query heads h reading each KV head, W_h = the output projection's
  rows of head h [D, E] (found after P·V through data movement), [KVH, D, D]; None when not found.

These are the statistics of the absorbed latent attention (:mod:`qsvd_export.compress.latent_factors`):
scores are qᵀk per head, so the key latent is fitted in the query-weighted metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qsvd_export.compress.graph_probe import probe_values
from qsvd_export.passes._graph import const_array
from qsvd_export.passes.find_attention import AttentionBlock


@dataclass
class AttentionStats:
    """Post-RoPE operand moments of one attention block (shapes in the module doc)."""

    heads: int
    kv_heads: int
    head_dim: int
    key: np.ndarray
    value: np.ndarray
    query: np.ndarray
    key_rows: list[np.ndarray]
    value_rows: list[np.ndarray]
    tokens: int = 0
    value_metric: np.ndarray | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def _operands(block: AttentionBlock) -> tuple[ir.Value, ir.Value, ir.Value]:
    assert block.k_cache is not None and block.v_cache is not None
    q = block.scores.inputs[0]
    assert q is not None
    return q, block.k_cache.new, block.v_cache.new


def output_projection(block: AttentionBlock) -> np.ndarray | None:
    """The constant weight [H·D, E] of the MatMul that P·V's output reaches through data movement, or None."""
    value = block.pv.outputs[0]
    for _ in range(8):
        users = [use.node for use in value.uses()]
        if len(users) != 1:
            return None
        node = users[0]
        if node.op_type == "MatMul" and node.inputs[0] is value:
            weight = const_array(node.inputs[1])
            return None if weight is None or weight.ndim != 2 else weight
        if node.op_type not in ("Transpose", "Reshape") or node.inputs[0] is not value:
            return None
        value = node.outputs[0]
    return None


def _value_metric(block: AttentionBlock, heads: int, kv_heads: int, dim: int) -> np.ndarray | None:
    weight = output_projection(block)
    if weight is None or weight.shape[0] != heads * dim:
        return None
    metric = np.zeros((kv_heads, dim, dim))
    for head in range(heads):
        rows = weight[head * dim:(head + 1) * dim].astype(np.float64)
        metric[head // (heads // kv_heads)] += rows @ rows.T
    return metric


def _rows(x: np.ndarray) -> np.ndarray:
    """[1, N, S, D] → [S, N·D] (heads concatenated per token)."""
    _, n, s, d = x.shape
    return np.ascontiguousarray(x[0].transpose(1, 0, 2).reshape(s, n * d), dtype=np.float64)


def attention_statistics(graph_path: Path, blocks: list[AttentionBlock], windows: np.ndarray,
                         sample_rows: int = 4096, seed: int = 0) -> list[AttentionStats]:
    """Moments of ``blocks`` (each with K/V cache Concats, found on the graph at ``graph_path``) over token
    ``windows`` [n, L], one window per run with an empty past (CPU EP)."""
    names = [value.name for block in blocks for value in _operands(block)]
    stats: list[AttentionStats] = []
    for block in blocks:
        q, k, _ = (v.shape for v in _operands(block))
        heads, kv_heads, dim = int(q[1]), int(k[1]), int(k[3])  # type: ignore[index,arg-type]
        width = kv_heads * dim
        stats.append(AttentionStats(heads, kv_heads, dim, np.zeros((width, width)), np.zeros((width, width)),
                                    np.zeros((kv_heads, dim, dim)), [], [],
                                    value_metric=_value_metric(block, heads, kv_heads, dim)))
    rng = np.random.default_rng(seed)
    per_window = max(1, sample_rows // max(len(windows), 1))
    for outputs in probe_values(graph_path, names, blocks, windows, "attention statistics"):  # type: ignore[arg-type]
        take = None
        for index, stat in enumerate(stats):
            q, k, v = (np.asarray(x) for x in outputs[3 * index: 3 * index + 3])
            keys, vals = _rows(k), _rows(v)
            stat.key += keys.T @ keys
            stat.value += vals.T @ vals
            for head in range(stat.heads):
                qh = q[0, head].astype(np.float64)
                stat.query[head // stat.group_size] += qh.T @ qh
            stat.tokens += keys.shape[0]
            if take is None:
                take = np.sort(rng.choice(keys.shape[0], size=min(per_window, keys.shape[0]), replace=False))
            stat.key_rows.append(keys[take].astype(np.float32))
            stat.value_rows.append(vals[take].astype(np.float32))
    return stats
