"""infer_dtypes: element types for the values a TorchScript export leaves untyped.

The TorchScript exporter (and optimum, which uses it) writes ``value_info`` for few intermediate values, so
many values carry a symbolic shape but no element type. The graph passes copy a neighbour's dtype onto the
values they create; an unknown one would write a typeless tensor type, which cannot be serialized. This pass
fills in the dtype of every untyped node output in one topological sweep, from the op's definition: the
type of its data input (elementwise and data-movement ops), ``to`` for Cast, int64 for Shape/Size/ArgMax,
bool for comparisons and logic, the tensor's type for Constant, the second input's for Where. Values it
cannot tell stay untyped; nothing typed is changed, and no shape is touched.
"""

from __future__ import annotations

import onnx_ir as ir

_SAME_AS_FIRST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Erf",
    "Relu", "Gelu", "Cos", "Sin", "Softmax", "LogSoftmax", "MatMul", "Gemm", "Max", "Min", "Sum", "Mean", "Identity",
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "Unsqueeze", "Squeeze",
    "Expand", "Tile", "Flatten", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "CumSum", "Range",
    "Trilu", "Clip", "LayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Dropout", "Pad", "Mod", "Floor", "Ceil", "Round", "ScatterND", "ScatterElements", "Resize", "Conv",
    "BatchNormalization", "ConvTranspose", "InstanceNormalization", "Einsum", "Sign",
}
_BOOL = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}
_INT64 = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}


def _dtype(node: ir.Node) -> ir.DataType | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if op == "Cast":
        to = node.attributes.get("to")
        return ir.DataType(to.value) if to is not None else None
    if op == "CastLike":
        return node.inputs[1].dtype if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if op in _INT64:
        return ir.DataType.INT64
    if op in _BOOL:
        return ir.DataType.BOOL
    if op == "Constant":
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.value.dtype
        if "value_float" in node.attributes or "value_floats" in node.attributes:
            return ir.DataType.FLOAT
        if "value_int" in node.attributes or "value_ints" in node.attributes:
            return ir.DataType.INT64
        return None
    if op == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr.value.dtype if attr is not None else ir.DataType.FLOAT
    if op == "Where":
        return next((v.dtype for v in node.inputs[1:] if v is not None and v.dtype is not None), None)
    if op in _SAME_AS_FIRST:
        first = node.inputs[0] if node.inputs else None
        if first is None or first.dtype is None:
            return None
        return first.dtype
    return None


def infer_dtypes(model: ir.Model) -> int:
    """Fill in the dtype of untyped node outputs of the main graph (in graph order, which is topological for
    a valid model); returns how many were set. Only each op's first output (and Split's) is typed."""
    count = 0
    for node in model.graph:
        outputs = node.outputs if node.op_type == "Split" else node.outputs[:1]
        missing = [o for o in outputs if o.dtype is None]
        if not missing:
            continue
        dtype = _dtype(node)
        if dtype is None:
            continue
        for value in missing:
            value.dtype = dtype
            count += 1
    return count
