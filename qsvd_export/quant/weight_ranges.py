"""MSE clip search for symmetric per-output-channel weight quantization (the npu target's int8 / int4 weights).

For each output channel (column n of W [K, N]) the clip c = f·max|W[:, n]| is chosen from a grid of
fractions f to minimize Σ_k r_k·(Q(W[k, n]) − W[k, n])², Q = symmetric round-to-nearest with scale
c / qmax and r_k a weight per input row. Measured on smollm2 (docs/results.md), the npu target uses
- int4: r_k = E[x_k²], the calibration activations' second moment of input channel k (the diagonal part
  of the expected output error E‖x·(Q(W) − W)‖²): w4a16 1.65× dense, absmax 1.94×. Plain weight-space
  error (r = 1) clips the large weights of rows that meet massive activation channels: 3.73×.
- int8: r = 1: w8a16 1.013×; absmax 1.020×, activation-weighted 1.022× (differences this small are
  within what the choice of calibration windows moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRACTIONS = np.linspace(0.5, 1.0, 51)


def mse_channel_clips(weight: np.ndarray, bits: int, row_weights: np.ndarray | None = None,
                      chunk: int = 1 << 22) -> np.ndarray:
    """Per output channel (axis 1 of ``weight`` [K, N]) the clip [N] (float64) minimizing the row-weighted
    squared quantization error (``row_weights`` [K], default ones)."""
    w = np.asarray(weight, dtype=np.float32)
    rows = np.ones(w.shape[0]) if row_weights is None else np.asarray(row_weights, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(w).max(axis=0).astype(np.float64)
    best_error = np.full(w.shape[1], np.inf)
    best = absmax.copy()
    columns = max(1, chunk // max(w.shape[0], 1))
    for start in range(0, w.shape[1], columns):  # bounded temporaries: [K, columns] per fraction
        block, top = w[:, start:start + columns], absmax[start:start + columns]
        for fraction in FRACTIONS:
            clip = np.maximum(top * fraction, 1e-12)
            scale = (clip / qmax).astype(np.float32)
            error = rows @ ((np.clip(np.rint(block / scale), -qmax, qmax) * scale - block) ** 2).astype(np.float64)
            better = error < best_error[start:start + columns]
            best_error[start:start + columns][better] = error[better]
            best[start:start + columns][better] = clip[better]
    return best


def weight_clips(float_path: Path, feeds: list[dict[str, np.ndarray]], bits: int) -> dict[str, np.ndarray]:
    """{weight name: per-channel clip [N]} for every MatMul of the graph at ``float_path`` with a 2-D
    initializer weight. At 4 bits each row is weighted by its input's per-channel second moment over
    ``feeds``; at 8 bits rows weigh the same (see the module docstring)."""
    weights = matmul_weights(float_path)
    moments = input_second_moments(float_path, feeds, weights) if bits == 4 else {}
    return {weight.name: mse_channel_clips(weight.array, bits, moments.get(node))
            for node, weight in sorted(weights.items())}


@dataclass(frozen=True)
class MatMulWeight:
    name: str
    array: np.ndarray  # [K, N] float32
    source: str  # the MatMul's input tensor


def matmul_weights(float_path: Path) -> dict[str, MatMulWeight]:
    """{MatMul node name: its 2-D initializer weight} of the graph at ``float_path``
    (:func:`qsvd_export.passes._graph.matmul_weight`, initializers only: the QDQ rules address them by name)."""
    import onnx_ir as ir

    from qsvd_export.passes._graph import matmul_weight

    found = {}
    for node in ir.load(float_path).graph:
        weight = matmul_weight(node, through_transpose=False)
        if weight is not None and node.inputs[1].is_initializer():  # type: ignore[union-attr]
            found[node.name] = MatMulWeight(node.inputs[1].name, weight, node.inputs[0].name)  # type: ignore[union-attr,arg-type]
    return found


def input_second_moments(float_path: Path, feeds: list[dict[str, np.ndarray]],
                         weights: dict[str, MatMulWeight]) -> dict[str, np.ndarray]:
    """{MatMul node name: E[x_k²] [K] of its input over ``feeds``}, floored at 1e-12 of the largest so no
    row weighs nothing."""
    from qsvd_export.quant.activation_ranges import session_with_outputs

    names = sorted({weight.source for weight in weights.values()})
    session = session_with_outputs(float_path, names)
    sums: dict[str, np.ndarray | float] = {name: 0.0 for name in names}
    counts = {name: 0 for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums[name] + (flat ** 2).sum(axis=0)
            counts[name] += flat.shape[0]
    moments = {name: np.asarray(sums[name]) / max(counts[name], 1) for name in names}
    return {node: moments[w.source] + 1e-12 * moments[w.source].max() for node, w in weights.items()}
