"""Differentiable evaluation of an ONNX graph in torch: gradients for graph-only plans.

A graph-only plan has no torch model, yet the gradient-based parts of QSVD (output-gradient Fisher
whitening, first-order singular-value importance) only need dL/dY for each projection output Y and the
projection input X: the weight gradient is Gᵀ·X. :class:`TorchGraph` runs the graph's nodes one by one as
torch ops (initializers as float32 constants, no parameters), with autograd on, so the loss of the
graph's own output (next-token cross-entropy of ``logits``, or a random probe of an encoder's hidden
states) can be differentiated with respect to chosen intermediate values.

Only the default ONNX domain (opset 21 semantics; older graphs are upgraded at load) is covered; a graph
with any other op raises :class:`UnsupportedGraph` naming it, and the caller falls back to gradient-free
importance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx_ir as ir
import torch

_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


class UnsupportedGraph(Exception):
    """The graph holds something :class:`TorchGraph` cannot evaluate (message names it)."""


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _ints(value: torch.Tensor | None) -> list[int] | None:
    return None if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _tensor(value: Any) -> torch.Tensor:
    """A torch tensor from an ONNX constant (float constants kept in float32 for autograd)."""
    array = np.array(value.numpy())  # a copy: external data is memory-mapped read-only
    tensor = torch.from_numpy(array)
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[[ir.Node, list[Any]], list[torch.Tensor]]:
    def run(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
        axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else _ints(torch.tensor(_attr(node, "axes", [])))
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], dim=axes, keepdim=keep)]
    return run


def _reshape(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    shape = _ints(x[1])
    assert shape is not None
    if not _attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


def _slice(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    assert starts is not None and ends is not None
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = data.shape[axis]
        if step < 0:
            data = data.flip(axis)  # torch slices need positive steps: mirror the bounds
            start, end = size - 1 - _clamp(start, size, -1), size - 1 - _clamp(end, size, -1)
            step = -step
        index[axis] = slice(_clamp(start, size, 0), _clamp(end, size, 0), step)
    return [data[tuple(index)]]


def _clamp(bound: int, size: int, low: int) -> int:
    bound = bound + size if bound < 0 else bound
    return max(low, min(bound, size if low == 0 else size - 1))


def _split(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axis = _attr(node, "axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    if sizes is None:
        parts = _attr(node, "num_outputs", len(node.outputs))
        chunk = math.ceil(x[0].shape[axis] / parts)
        sizes = [min(chunk, x[0].shape[axis] - i * chunk) for i in range(parts)]
    return list(torch.split(x[0], sizes, dim=axis))


def _gemm(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    a = x[0].T if _attr(node, "transA", 0) else x[0]
    b = x[1].T if _attr(node, "transB", 0) else x[1]
    y = _attr(node, "alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + _attr(node, "beta", 1.0) * x[2]
    return [y]


def _layer_norm(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axis = _attr(node, "axis", -1)
    axis = axis + x[0].dim() if axis < 0 else axis
    shape = list(x[0].shape[axis:])
    bias = x[2] if len(x) > 2 else None
    y = torch.nn.functional.layer_norm(x[0].float(), shape, x[1].float(), None if bias is None else bias.float(),
                                       _attr(node, "epsilon", 1e-5))
    return [y]


def _cast(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    dtype = _DTYPES.get(ir.DataType(_attr(node, "to")))
    if dtype is None:
        raise UnsupportedGraph(f"node {node.name}: Cast to {ir.DataType(_attr(node, 'to')).name}")
    if dtype in (torch.float16, torch.bfloat16, torch.float64):
        dtype = torch.float32  # computed in float32: the gradients only steer a rank choice
    return [x[0].to(dtype)]


def _constant(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    for name, attribute in node.attributes.items():
        if name == "value":
            return [_tensor(attribute.value)]
        if name in ("value_float", "value_int"):
            return [torch.tensor(attribute.value)]
        if name in ("value_floats", "value_ints"):
            return [torch.tensor(list(attribute.value))]
    raise UnsupportedGraph(f"node {node.name}: Constant without a tensor value")


def _constant_of_shape(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    value = _attr(node, "value")
    fill = _tensor(value) if value is not None else torch.zeros(1)
    return [fill.reshape(-1)[0].expand(_ints(x[0]) or []).clone()]


def _expand(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1]) or []))
    return [x[0].expand(shape)]


def _gather(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axis = _attr(node, "axis", 0)
    axis = axis + x[0].dim() if axis < 0 else axis
    indices = x[1].long()
    indices = torch.where(indices < 0, indices + x[0].shape[axis], indices)
    flat = torch.index_select(x[0], axis, indices.reshape(-1))
    return [flat.reshape(tuple(x[0].shape[:axis]) + tuple(indices.shape) + tuple(x[0].shape[axis + 1:]))]


def _shape(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    dims = list(x[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)]


def _unsqueeze(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axes = _ints(x[1]) or []
    rank = x[0].dim() + len(axes)
    y = x[0]
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        y = y.unsqueeze(axis)
    return [y]


def _squeeze(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    if axes is None:
        return [x[0].squeeze()]
    return [x[0].squeeze(tuple(a + x[0].dim() if a < 0 else a for a in axes))]


def _softmax(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    return [torch.softmax(x[0], dim=_attr(node, "axis", -1))]


def _transpose(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    perm = _attr(node, "perm", None)
    return [x[0].permute(*(list(perm) if perm is not None else reversed(range(x[0].dim()))))]


def _range(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    start, limit, delta = (v.item() for v in x[:3])
    return [torch.arange(start, limit, delta, dtype=x[0].dtype)]


def _trilu(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if _attr(node, "upper", 1) else torch.tril(x[0], k)]


def _gelu(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    return [torch.nn.functional.gelu(x[0], approximate=_attr(node, "approximate", "none"))]


def _gather_elements(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axis = _attr(node, "axis", 0)
    indices = x[1].long()
    return [torch.gather(x[0], axis, torch.where(indices < 0, indices + x[0].shape[axis], indices))]


def _gather_nd(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    """GatherND with batch_dims 0 (the dynamo exporter's mask indexing): out[i] = data[indices[i, :]]."""
    if _attr(node, "batch_dims", 0):
        raise UnsupportedGraph(f"node {node.name}: GatherND with batch_dims")
    data, indices = x[0], x[1].long()
    axes = indices.unbind(-1)
    axes = tuple(torch.where(a < 0, a + data.shape[i], a) for i, a in enumerate(axes))
    return [data[axes]]


def _clip(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    low = x[1] if len(x) > 1 and x[1] is not None else None
    high = x[2] if len(x) > 2 and x[2] is not None else None
    return [torch.clamp(x[0], low, high)]


def _cumsum(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    axis = int(x[1].item())
    data = x[0].flip(axis) if _attr(node, "reverse", 0) else x[0]
    y = torch.cumsum(data, axis)
    if _attr(node, "exclusive", 0):
        y = y - data
    return [y.flip(axis) if _attr(node, "reverse", 0) else y]


def _conv(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedGraph(f"node {node.name}: Conv auto_pad {_attr(node, 'auto_pad')}")
    spatial = x[0].dim() - 2
    pads = list(_attr(node, "pads", [0] * 2 * spatial))
    padded = x[0]
    if any(pads):  # ONNX [x1_begin, x2_begin, ..., x1_end, x2_end]; F.pad wants the last axis first
        padded = torch.nn.functional.pad(x[0], [p for axis in reversed(range(spatial)) for p in (pads[axis], pads[axis + spatial])])
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}.get(spatial)
    if conv is None:
        raise UnsupportedGraph(f"node {node.name}: Conv over {spatial} spatial axes")
    bias = x[2] if len(x) > 2 else None
    return [conv(padded, x[1], bias, stride=list(_attr(node, "strides", [1] * spatial)),
                 dilation=list(_attr(node, "dilations", [1] * spatial)), groups=_attr(node, "group", 1))]


def _resize(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    """Resize over the trailing spatial axes (batch and channel kept), the modes torch.interpolate shares
    with ONNX: nearest (asymmetric, floor), linear/cubic (half_pixel, pytorch_half_pixel or align_corners;
    cubic with a = -0.75), no antialias."""
    mode, transform = _attr(node, "mode", "nearest"), _attr(node, "coordinate_transformation_mode", "half_pixel")
    data = x[0]
    sizes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
    scales = x[2].reshape(-1).tolist() if len(x) > 2 and x[2] is not None and x[2].numel() else None
    if sizes is None and scales is not None:
        sizes = [int(math.floor(d * s)) for d, s in zip(data.shape, scales)]
    supported = (
        sizes is not None and len(sizes) == data.dim() and list(sizes[:2]) == list(data.shape[:2])
        and not _attr(node, "antialias", 0) and _attr(node, "axes", None) is None
        and ((mode == "nearest" and transform == "asymmetric" and _attr(node, "nearest_mode", "round_prefer_floor") == "floor")
             or (mode in ("linear", "cubic") and transform in ("half_pixel", "pytorch_half_pixel", "align_corners")
                 and float(_attr(node, "cubic_coeff_a", -0.75)) == -0.75 and not _attr(node, "exclude_outside", 0)))
    )
    if not supported:
        raise UnsupportedGraph(f"node {node.name}: Resize mode {mode} / {transform}")
    spatial = data.dim() - 2
    torch_mode = mode if mode == "nearest" else {("linear", 1): "linear", ("linear", 2): "bilinear",
                                                  ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}.get((mode, spatial))
    if torch_mode is None:
        raise UnsupportedGraph(f"node {node.name}: Resize {mode} over {spatial} axes")
    align = None if mode == "nearest" else transform == "align_corners"
    return [torch.nn.functional.interpolate(data, size=list(sizes[2:]), mode=torch_mode, align_corners=align)]


def _pow(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
    exponent = x[1]
    if exponent.numel() == 1 and float(exponent) == 2.0:
        return [x[0] * x[0]]
    return [torch.pow(x[0], exponent.to(x[0].dtype) if x[0].is_floating_point() else exponent)]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[ir.Node, list[Any]], list[torch.Tensor]]:
    return lambda node, x: [fn(x[0], x[1])]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[ir.Node, list[Any]], list[torch.Tensor]]:
    return lambda node, x: [fn(x[0])]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[ir.Node, list[Any]], list[torch.Tensor]]:
    def run(node: ir.Node, x: list[Any]) -> list[torch.Tensor]:
        y = x[0]
        for other in x[1:]:
            y = fn(y, other)
        return [y]
    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


OPS: dict[str, Callable[[ir.Node, list[Any]], list[torch.Tensor]]] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": _pow, "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid),
    "Erf": _unary(torch.erf), "Relu": _unary(torch.relu), "Cos": _unary(torch.cos), "Sin": _unary(torch.sin),
    "Identity": _unary(lambda t: t), "Gelu": _gelu,
    "Where": lambda node, x: [torch.where(x[0].bool(), x[1], x[2])],
    "Cast": _cast, "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Reshape": _reshape, "Transpose": _transpose, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Flatten": lambda node, x: [x[0].reshape(int(np.prod(x[0].shape[:_attr(node, "axis", 1)])), -1)],
    "Expand": _expand, "Concat": lambda node, x: [torch.cat([t for t in x if t is not None], dim=_attr(node, "axis"))],
    "Slice": _slice, "Split": _split, "Gather": _gather, "Shape": _shape, "Range": _range, "Trilu": _trilu,
    "Softmax": _softmax, "LayerNormalization": _layer_norm, "GatherElements": _gather_elements, "Clip": _clip,
    "IsNaN": _unary(torch.isnan), "GatherND": _gather_nd,
    "CumSum": _cumsum, "Conv": _conv, "Resize": _resize, "Tile": lambda node, x: [x[0].repeat(*(_ints(x[1]) or []))],
    "Mod": lambda node, x: [torch.fmod(x[0], x[1]) if _attr(node, "fmod", 0) else torch.remainder(x[0], x[1])],
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
}


class TorchGraph:
    """An ONNX graph evaluated node by node in torch (float32, autograd on).

    ``run(feeds, watch, leaves)`` returns the graph outputs, the ``watch``ed intermediate values and, for
    each of ``leaves``, a zero leaf δ added to that value (y + δ), so that dL/dδ of a loss of the outputs
    is dL/dy, the total derivative through every path downstream. Nothing upstream of the first leaf is
    recorded by autograd.
    """

    def __init__(self, model: ir.Model) -> None:
        graph = model.graph
        unsupported = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in graph
                              if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})
        if unsupported:
            raise UnsupportedGraph(f"ops outside the differentiable set: {', '.join(unsupported)}")
        self.nodes = list(graph)
        self.inputs = list(graph.inputs)
        self.outputs = [v.name for v in graph.outputs]
        self.constants = {name: _tensor(v.const_value) for name, v in graph.initializers.items()
                          if v.const_value is not None}
        self._last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for value in node.inputs:
                if value is not None:
                    self._last_use[value.name] = index

    @classmethod
    def load(cls, path: Path) -> TorchGraph:
        """The graph at ``path``, checked and upgraded to opset 21 as the graph stage loads it."""
        from qsvd_export.onnx_io import load_onnx

        return cls(load_onnx(path))

    def input_descriptions(self) -> list[Any]:
        """Graph inputs in the shape ``runtimes.feeds.first_step_feed`` reads (name, type string, shape)."""
        class Described:
            def __init__(self, value: ir.Value) -> None:
                self.name = value.name
                self.type = {ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)"}.get(
                    value.dtype, f"tensor({value.dtype})")
                self.shape = [d if isinstance(d, int) else str(d) for d in (value.shape or [])]
        return [Described(v) for v in self.inputs]

    def run(self, feeds: dict[str, np.ndarray], watch: Iterable[str] = (),
            leaves: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(graph outputs by name, ``watch``ed values and ``leaves``' δ by name) for ``feeds`` (numpy, by input name)."""
        cut = set(leaves)
        watched = set(watch) | cut
        keep = watched | set(self.outputs)
        env: dict[str, torch.Tensor | None] = {name: _input_tensor(array) for name, array in feeds.items()}
        seen: dict[str, torch.Tensor] = {}
        for index, node in enumerate(self.nodes):
            args = [None if v is None or not v.name else self._value(v.name, env) for v in node.inputs]
            try:
                results = OPS[node.op_type](node, args)
            except UnsupportedGraph:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise UnsupportedGraph(f"node {node.name} ({node.op_type}): {exc}") from None
            for value, result in zip(node.outputs, results):
                if value.name:
                    if value.name in cut:  # y + δ, δ = 0 a leaf: dL/dδ = dL/dy, every path kept
                        probe = torch.zeros_like(result, requires_grad=True)
                        seen[value.name] = probe
                        result = result + probe
                    elif value.name in watched:
                        seen[value.name] = result
                    env[value.name] = result
            for value in node.inputs:  # drop what no later node reads (autograd keeps what it needs)
                if value is not None and self._last_use.get(value.name) == index and value.name not in keep:
                    env.pop(value.name, None)
        missing = watched - set(seen) - set(feeds)
        if missing:
            raise UnsupportedGraph(f"watched values not produced by any node: {', '.join(sorted(missing))}")
        outputs = {name: self._value(name, env) for name in self.outputs}
        return outputs, seen

    def _value(self, name: str, env: dict[str, torch.Tensor | None]) -> torch.Tensor:
        if name in env:
            value = env[name]
        elif name in self.constants:
            value = self.constants[name]
        else:
            raise UnsupportedGraph(f"value {name} is read before it is computed")
        assert value is not None
        return value


def _input_tensor(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() if tensor.dtype == torch.float16 else tensor
