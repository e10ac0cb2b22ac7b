"""``npu_legalize``: make a static decoder graph compile whole on QNN HTP, and list what still would not.

Rewrites (outputs unchanged up to the mask value):
- RMSNorm (Pow→ReduceMean→Add→Sqrt→Reciprocal→Mul→Mul) → ``SimplifiedLayerNormalization``
  (onnxscript's ORT fusion). QNN runs it as one RmsNorm; decomposed, mean(x²) reaches ~1e6 and a single
  16-bit range for it erases ordinary tokens.
- Float "minus infinity" stand-ins (scalar constants with |v| >= 1e30, e.g. the dtype-min of an additive
  attention mask) → ±``mask_value``: a 16-bit activation range must hold the masked scores, and
  exp(-mask_value) is already 0 in fp32 for any realistic score spread.

Check (:func:`npu_violations`): ops outside the QNN HTP set this tool targets, boolean tensors (HTP has no
float ``Select`` on them), 64-bit float tensors and dynamic dims, each with the node name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

MINUS_INFINITY_STANDIN = 1e30
DEFAULT_MASK_VALUE = 100.0

# Ops the QNN EP maps to HTP ops (onnxruntime qnn/builder/op_builder_factory.cc), restricted to what
# transformer decoders use. QuantizeLinear/DequantizeLinear fold into quantized tensors.
HTP_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Max", "Min",
    "MatMul", "Gemm", "Softmax", "Sigmoid", "Tanh", "Relu", "Gelu", "Erf", "Cos", "Sin", "Cast",
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Unsqueeze", "Squeeze", "Expand", "Tile",
    "ReduceMean", "ReduceMax", "ReduceSum", "CumSum", "LayerNormalization", "SimplifiedLayerNormalization",
    "QuantizeLinear", "DequantizeLinear", "Identity",
})


@dataclass
class LegalizeReport:
    rms_norms_fused: int = 0
    mask_constants_clamped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rms_norms_fused": self.rms_norms_fused, "mask_constants_clamped": len(self.mask_constants_clamped)}


def _clamp_minus_infinity(value: ir.Value, mask_value: float) -> bool:
    tensor = value.const_value
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size != 1:
        return False
    array = tensor.numpy()
    scalar = float(array.reshape(-1)[0])
    if abs(scalar) < MINUS_INFINITY_STANDIN:
        return False
    value.const_value = ir.tensor(np.full(array.shape, np.copysign(mask_value, scalar), np.float32), name=value.name)
    return True


def legalize_for_npu(model: ir.Model, mask_value: float = DEFAULT_MASK_VALUE) -> LegalizeReport:
    """Fuse RMSNorm and clamp minus-infinity constants, in place."""
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    report = LegalizeReport(rms_norms_fused=int(fuse_rms_normalization(model)))
    for value in model.graph.initializers.values():
        if _clamp_minus_infinity(value, mask_value):
            report.mask_constants_clamped.append(value.name or "")
    return report


def npu_violations(model: ir.Model) -> list[str]:
    """Why QNN HTP would not take every node: one line per problem, naming the node."""
    problems = []
    for node in model.graph:
        label = f"{node.op_type} {node.name}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in HTP_OPS:
            problems.append(f"{label}: op {node.domain + '::' if node.domain else ''}{node.op_type} is not run by QNN HTP")
        for output in node.outputs:
            if output.dtype == ir.DataType.BOOL:
                problems.append(f"{label}: boolean output {output.name} (HTP has no boolean select)")
            elif output.dtype == ir.DataType.DOUBLE:
                problems.append(f"{label}: float64 output {output.name}")
            if output.shape is not None and not output.shape.is_static():
                problems.append(f"{label}: dynamic shape {output.shape} on {output.name}")
    for value in model.graph.inputs:
        if value.shape is None or not value.shape.is_static():
            problems.append(f"input {value.name}: dynamic shape {value.shape}")
    return problems
