"""``npu_legalize``: list what would stop a static decoder graph from compiling whole on QNN HTP.

The rewrites that make it compile (RMSNorm fusion, mask constants clamped) are shared with the gpu
target: :mod:`qsvd_export.passes.low_precision`.

Check (:func:`npu_violations`): ops outside the QNN HTP set this tool targets, boolean tensors (HTP has no
float ``Select`` on them), 64-bit float tensors and dynamic dims, each with the node name.
"""

from __future__ import annotations

import onnx_ir as ir

# Ops the QNN EP maps to HTP ops (onnxruntime qnn/builder/op_builder_factory.cc), restricted to what
# transformer decoders use. QuantizeLinear/DequantizeLinear fold into quantized tensors.
HTP_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Max", "Min",
    "MatMul", "Gemm", "Softmax", "Sigmoid", "Tanh", "Relu", "Gelu", "Erf", "Cos", "Sin", "Cast",
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Unsqueeze", "Squeeze", "Expand", "Tile",
    "ReduceMean", "ReduceMax", "ReduceSum", "CumSum", "LayerNormalization", "SimplifiedLayerNormalization",
    "QuantizeLinear", "DequantizeLinear", "Identity",
})


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
