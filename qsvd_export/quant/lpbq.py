"""Blockwise int4 weights for QNN HTP: low-power block quantization (LPBQ).

HTP takes blockwise int4 weights in one form only (onnxruntime's QNN EP ``LowPowerBlockQuantized*Fusion``):
two-level scales, a float scale per output channel times an unsigned 4-bit integer per block. In ONNX:

    block_codes uint8 [K/B, N] (values 1..16) ─DequantizeLinear(channel_scale float [N], axis=1)─▶ S [K/B, N]
    W_q int4 [K, N] ─DequantizeLinear(S, zero int4 [K/B, N], axis=0, block_size=B)─▶ MatMul input 1

so block b of channel n has the scale ``codes[b, n] · channel_scale[n]``. Measured on the x86 HTP
simulator (one 576×576 MatMul, uint16 activations): block codes 1..16 match the CPU EP to 5e-5 relative;
codes above 16 give garbage without an error; int8 weights in this form are refused.

The codes are chosen per block by a search over all 16 values minimizing the row-weighted squared error
Σ_k r_k·(Q(W[k, n]) − W[k, n])² (r_k = E[x_k²] of the MatMul's input, as for the per-channel int4 clips in
:mod:`qsvd_export.quant.weight_ranges`); small codes clip the block, so the search is also the clip search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CODE_LEVELS = 16  # HTP's LPBQ block scales are 4-bit unsigned: 1..16 times the channel scale
INT4_MIN, INT4_MAX = -8, 7


@dataclass(frozen=True)
class LpbqBlocks:
    """One weight [K, N] in LPBQ form: ``values`` int8 in [-8, 7] (int4 on disk), ``codes`` uint8
    [K/B, N] in 1..16, ``channel_scale`` float32 [N]; dequantized W ≈ values · codes[k // B] · channel_scale."""

    values: np.ndarray
    codes: np.ndarray
    channel_scale: np.ndarray
    block: int

    def dequantized(self) -> np.ndarray:
        scales = np.repeat(self.codes.astype(np.float32), self.block, axis=0) * self.channel_scale
        return self.values.astype(np.float32) * scales


def lpbq_quantize(weight: np.ndarray, block: int, row_weights: np.ndarray | None = None) -> LpbqBlocks:
    """LPBQ of ``weight`` [K, N] (K divisible by ``block``) with the per-block code search (module doc)."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    if k % block:
        raise ValueError(f"{k} input channels are not a multiple of the block size {block}")
    rows = np.ones(k) if row_weights is None else np.asarray(row_weights, dtype=np.float64)
    blocks = w.reshape(k // block, block, n)
    block_rows = rows.reshape(k // block, block, 1)
    channel_scale = np.maximum(np.abs(w).max(axis=0) / (INT4_MAX * CODE_LEVELS), 1e-12).astype(np.float32)
    best_error = np.full((k // block, n), np.inf)
    codes = np.full((k // block, n), CODE_LEVELS, dtype=np.uint8)
    for code in range(1, CODE_LEVELS + 1):
        scale = (np.float32(code) * channel_scale)[None, None, :]
        error = (block_rows * (np.clip(np.rint(blocks / scale), INT4_MIN, INT4_MAX) * scale - blocks) ** 2).sum(axis=1)
        better = error < best_error
        best_error[better] = error[better]
        codes[better] = code
    scales = np.repeat(codes.astype(np.float32), block, axis=0) * channel_scale
    values = np.clip(np.rint(w / scales), INT4_MIN, INT4_MAX).astype(np.int8)
    return LpbqBlocks(values, codes, channel_scale, block)


def rewrite_as_lpbq(qdq_path: Path, out_path: Path, weights: dict[str, np.ndarray], block: int,
                    row_weights: dict[str, np.ndarray]) -> dict[str, int]:
    """Write to ``out_path`` (external data beside it) the QDQ graph at ``qdq_path`` with each MatMul whose
    weight is a per-channel int4 ``DequantizeLinear`` of an initializer in the LPBQ form. ``weights`` maps
    MatMul node names to their float weights [K, N]; ``row_weights`` maps them to r [K] (missing: ones).
    A weight whose K is not a multiple of ``block`` stays per channel. Returns counts."""
    import onnx_ir as ir

    from qsvd_export.passes._graph import initializer

    model = ir.load(qdq_path)
    graph = model.graph
    done = kept = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.name not in weights:
            continue
        dq = node.inputs[1].producer() if node.inputs[1] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
            continue
        quantized = dq.inputs[0]
        if quantized.const_value is None or quantized.dtype != ir.DataType.INT4:
            continue
        weight = weights[node.name]
        if weight.shape[0] % block:
            kept += 1
            continue
        lpbq = lpbq_quantize(weight, block, row_weights.get(node.name))
        prefix = quantized.name
        quantized.const_value = ir.Tensor(lpbq.values, dtype=ir.DataType.INT4, name=quantized.name)
        codes = initializer(graph, f"{prefix}/block_codes", lpbq.codes)
        channel = initializer(graph, f"{prefix}/channel_scale", lpbq.channel_scale)
        code_zero = initializer(graph, f"{prefix}/block_codes_zero", np.zeros(weight.shape[1], np.uint8))
        zero = initializer(graph, f"{prefix}/block_zero", np.zeros(lpbq.codes.shape, np.int8), ir.DataType.INT4)
        scale_node = ir.node("DequantizeLinear", [codes, channel, code_zero], attributes={"axis": 1},
                             name=f"{prefix}/block_scales")
        graph.insert_before(dq, scale_node)
        scale_node.outputs[0].name = f"{prefix}/block_scales"
        old_scale, old_zero = dq.inputs[1], dq.inputs[2]
        dq.replace_input_with(1, scale_node.outputs[0])
        dq.replace_input_with(2, zero)
        dq.attributes["axis"] = ir.AttrInt64("axis", 0)
        dq.attributes["block_size"] = ir.AttrInt64("block_size", block)
        for unused in (old_scale, old_zero):
            if unused is not None and not unused.uses() and unused.name in graph.initializers:
                graph.initializers.pop(unused.name)
        done += 1
    ir.save(model, out_path, external_data=f"{out_path.name}.data")
    return {"lpbq_matmuls": done, "per_channel_int4_matmuls": kept}
