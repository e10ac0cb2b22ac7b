"""QDQ insertion with ONNX Runtime's QNN recipe: per-op rules, activation ranges, per-channel or LPBQ weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.errors import RuntimeFailure
from qsvd_export.quant.presets import Bits
from qsvd_export.targets.npu.qdq_rules import apply_rules
from qsvd_export.targets.npu.static_graphs import FeedReader



def tensor_overrides(float_path: Path, weight: Any, matmul_inputs: Any | None,
                     clips: dict[str, np.ndarray] | None = None) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Tensor overrides for the QNN recipe, from the rules of :mod:`.qdq_rules` (also returned: each rule with
    its ``why`` and the tensors it set, for report.json).

    - Every 2-D initializer a MatMul reads as its weight [K, N]: symmetric per-output-channel scales
      (axis 1). The recipe's default is per-tensor for MatMul, which on smollm2 alone costs 7% perplexity
      at int8; QNN HTP compiles the per-channel form (checked in tests). With ``clips`` ({weight name:
      per-channel clip}, :func:`qsvd_export.quant.weight_ranges.weight_clips`) a channel's range is its clip
      instead of its absolute maximum.
    - ``matmul_inputs`` (the ``a8`` presets): where a MatMul reads the RMSNorm output (q/k/v, MLP gate:
      41% of smollm2's weight MACs) its input is converted to that type for the MatMul only (a QNN
      Convert; RmsNorm must output its input's type) and its output uses that type too (QNN's quantized
      MatMul takes one activation width in and out). The GLU value branch (up_proj: an expanding
      MatMul whose output feeds no activation) stays 16-bit: its output carries the MLP's massive
      outliers (smollm2 with H1: 1.64x with it at 8 bits, 1.026x without). Every other activation keeps
      16 bits: the residual stream (massive per-token outliers that no rotation removes), the attention
      core and the o_proj/down_proj outputs that write into the residual (smollm2: ppl > 1e6 with
      everything at 8 bits, even with the residual or the attention core left in float).
    - With int4 weights the MatMul that writes a graph output (an untied lm_head) keeps int8 weights, as
      on the cpu target (smollm2 with H1, w4a16: 1.63x dense with an int4 head)."""
    import onnx

    proto = onnx.load(float_path, load_external_data=False)
    if any(not node.name for node in proto.graph.node):
        raise RuntimeFailure("QDQ overrides need named nodes; the static graph has unnamed ones")
    return apply_rules(proto, weight, matmul_inputs, clips)


def insert_qdq(float_path: Path, out_path: Path, bits: Bits, feeds: list[dict[str, np.ndarray]],
               method: str, clips: dict[str, np.ndarray] | None = None,
               fixed: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Calibrate activation ranges on ``feeds`` and write the QDQ graph (external data) to ``out_path``;
    ``fixed``: overrides set by the caller (the cache I/O's static ranges, :mod:`.cache_io`)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from qsvd_export.quant.activation_ranges import clipped_ranges

    matmul_inputs = {16: None, 8: QuantType.QUInt8}[bits.activations or 16]
    weight = {8: QuantType.QInt8, 4: QuantType.QInt4}[bits.weights or 8]
    overrides, rules = tensor_overrides(float_path, weight, matmul_inputs, clips)
    # the 8-bit activations (a8 presets): the tensors a calibration method other than min/max clips
    low_bit = {name: (entry[0]["convert"] if "convert" in entry[0] else entry[0])
               for name, entry in overrides.items()
               if (entry[0].get("convert") or entry[0]).get("quant_type") == QuantType.QUInt8}
    ranges = clipped_ranges(float_path, feeds, {name: 8 for name in low_bit}, method)
    for name, (rmin, rmax) in ranges.items():
        low_bit[name].update(rmin=np.float32(rmin), rmax=np.float32(rmax))
    overrides.update(fixed or {})  # after the clipping: these ranges are the caller's
    config = get_qnn_qdq_config(str(float_path), FeedReader(feeds), calibrate_method=CalibrationMethod.MinMax,
                                activation_type=QuantType.QUInt16, weight_type=weight, weight_symmetric=True,
                                init_overrides=overrides)
    config.use_external_data_format = True
    ort.set_default_logger_severity(3)  # the quantizer's sessions warn about every unused initializer
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # and it logs a pre-processing hint through the root logger
    try:
        quantize(str(float_path), str(out_path), config)
    finally:
        root.setLevel(level)
    activations = ("QUInt16" if matmul_inputs is None
                   else "QUInt8 in/out of the MatMuls reading the norm (q/k/v, MLP gate), QUInt16 elsewhere")
    clip = ", MSE-clipped ranges" if clips is not None else ""
    return {"activations": activations, "weights": f"{weight.name} symmetric per output channel (MatMul){clip}",
            "calibration": {"method": method, "feeds": len(feeds), "clipped_tensors": len(ranges)},
            "qdq_rules": rules}


def blockwise_int4(qdq_path: Path, weights: dict[str, Any], block: int, row_weights: dict[str, np.ndarray],
                    qdq_report: dict[str, Any]) -> Path:
    """The QDQ graph with its int4 MatMul weights (``weights``: the float graph's
    :class:`~qsvd_export.quant.weight_ranges.MatMulWeight` per MatMul node) in LPBQ blocks
    (:mod:`qsvd_export.quant.lpbq`); updates ``qdq_report``'s weight description. Returns the new path."""
    from qsvd_export.quant.lpbq import rewrite_as_lpbq

    out_path = qdq_path.with_name(f"{qdq_path.stem}_lpbq.onnx")
    counts = rewrite_as_lpbq(qdq_path, out_path, {node: w.array for node, w in weights.items()}, block, row_weights)
    qdq_report["weights"] = (f"int4 LPBQ: blocks of {block} input channels, 4-bit block scale codes x a float "
                             "scale per output channel, per-block code search weighted by E[x^2]")
    qdq_report["weight_blocks"] = counts
    return out_path

