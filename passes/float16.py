"""``to_float16``: fp16 activations, float weights and cache for the gpu target (CUDA EP), in place.

Contract: graph input/output names are unchanged; float graph inputs and outputs (the KV or latent cache)
become float16 except ``keep_float32`` outputs (default ``logits``: perplexity and sampling see fp32).
Before converting, RMSNorm is fused into ``SimplifiedLayerNormalization`` (fp32 accumulation inside the
kernel) and minus-infinity mask constants become ±``mask_value`` (:mod:`qsvd_export.passes.low_precision`).

The rotary angle subgraph (``Cos``/``Sin`` and everything they depend on) stays fp32, inputs included:
position × inverse frequency reaches ~2000 rad at a 2048 context, where fp16's spacing is 2, and an
fp16-rounded inverse frequency (relative error up to 5e-4) is already off by ~1 rad there. onnxruntime's
``float16.convert_float_to_float16`` was tried first: it rounds the blocked nodes' initializers to fp16 and
round-trips every edge between two blocked nodes through fp16, so this pass converts on the IR itself:
one Cast where fp32 angles meet fp16 nodes, one Cast before each kept fp32 output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.passes.contracts import GraphPass

FP16_MASK_VALUE = 1.0e4  # exp(-1e4) is 0; 1e4 + any score stays finite in fp16
FP16_MAX = float(np.finfo(np.float16).max)
ANGLE_OPS = ("Cos", "Sin")
FLOAT = ir.DataType.FLOAT
FLOAT16 = ir.DataType.FLOAT16


@dataclass
class Float16Report:
    rms_norms_fused: int
    mask_constants_clamped: int
    fp32_nodes: int  # rotary angle nodes kept in fp32
    casts_inserted: int
    weights_clipped: int  # initializers with values beyond ±65504 (clipped)

    def as_dict(self) -> dict[str, Any]:
        return {"activations": "float16", "rms_norms_fused": self.rms_norms_fused,
                "mask_constants_clamped": self.mask_constants_clamped, "fp32_nodes": self.fp32_nodes,
                "casts_inserted": self.casts_inserted, "weights_clipped": self.weights_clipped}


def angle_nodes(model: ir.Model) -> set[ir.Node]:
    """``Cos``/``Sin`` nodes and every node they depend on."""
    keep: set[ir.Node] = set()
    stack = [node for node in model.graph if node.op_type in ANGLE_OPS]
    while stack:
        node = stack.pop()
        if node in keep:
            continue
        keep.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return keep


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, before: ir.Node, name: str) -> ir.Value:
    node = ir.node("Cast", [value], attributes={"to": to}, name=f"{name}_cast_to_{to.name.lower()}")
    node.outputs[0].name = f"{name}_{to.name.lower()}"
    node.outputs[0].dtype = to
    node.outputs[0].shape = value.shape
    graph.insert_before(before, node)
    return node.outputs[0]


def _to_fp16_tensor(value: ir.Value) -> bool:
    """Replace a float initializer's data by fp16; returns whether values had to be clipped."""
    array = value.const_value.numpy()  # type: ignore[union-attr]
    clipped = bool(np.any(np.abs(array) > FP16_MAX))
    value.const_value = ir.tensor(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), name=value.name)
    value.dtype = FLOAT16
    return clipped


def to_float16(model: ir.Model, keep_float32: tuple[str, ...] = ("logits",),
               mask_value: float = FP16_MASK_VALUE) -> Float16Report:
    """Convert ``model`` to fp16 activations in place (see the module docstring for the contract)."""
    from qsvd_export.passes.low_precision import fuse_norms_and_clamp_masks

    legal = fuse_norms_and_clamp_masks(model, mask_value)  # also lifts every Constant to an initializer
    graph = model.graph
    fp32 = angle_nodes(model)
    casts = clipped = 0
    for value in list(graph.initializers.values()):
        if value.dtype != FLOAT:
            continue
        users = {use.node for use in value.uses()}
        if users & fp32 and users - fp32:  # shared by both worlds: the fp16 side gets its own copy
            copy = ir.Value(name=f"{value.name}_float16", shape=value.shape, type=value.type,
                            const_value=value.const_value)
            graph.register_initializer(copy)
            for use in list(value.uses()):
                if use.node not in fp32:
                    use.node.replace_input_with(use.idx, copy)
            clipped += _to_fp16_tensor(copy)
        elif not users & fp32:
            clipped += _to_fp16_tensor(value)
    for value in graph.inputs:
        if value.dtype == FLOAT:
            value.dtype = FLOAT16
    for node in list(graph):
        if node in fp32:
            for output in node.outputs:  # fp32 angles (cos, sin) entering fp16 nodes
                fp16_uses = [use for use in output.uses() if use.node not in fp32]
                if output.dtype == FLOAT and fp16_uses:
                    cast = _cast(graph, output, FLOAT16, fp16_uses[0].node, output.name or node.name)
                    casts += 1
                    for use in fp16_uses:
                        use.node.replace_input_with(use.idx, cast)
            continue
        if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype == FLOAT:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float16)))
        for output in node.outputs:
            if output.dtype == FLOAT:
                output.dtype = FLOAT16
    for index, output in enumerate(list(graph.outputs)):
        if output.name in keep_float32 and output.dtype == FLOAT16:
            name = output.name
            output.name = f"{name}_float16"
            node = ir.node("Cast", [output], attributes={"to": FLOAT}, name=f"{name}_cast_to_float")
            node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = name, FLOAT, output.shape
            graph.append(node)
            graph.outputs[index] = node.outputs[0]
            casts += 1
    common.TopologicalSortPass()(model)
    return Float16Report(legal.rms_norms_fused, len(legal.mask_constants_clamped), len(fp32), casts, clipped)


class Float16Pass(GraphPass):
    """:func:`to_float16` as a pass (``self.report``). requires: a mask value fp16 can hold.
    ensures: the contract above: float graph inputs and outputs are float16, except the ``keep_float32`` outputs."""

    def __init__(self, keep_float32: tuple[str, ...] = ("logits",), mask_value: float = FP16_MASK_VALUE) -> None:
        super().__init__()
        self.keep_float32, self.mask_value = keep_float32, mask_value
        self.report: Float16Report | None = None

    def requires(self, model: ir.Model) -> None:
        if not 0 < self.mask_value <= FP16_MAX:
            raise self.precondition(f"mask value {self.mask_value} is not a positive float16 ({FP16_MAX:g} at most)")

    def ensures(self, model: ir.Model) -> None:
        for value in [*model.graph.inputs, *model.graph.outputs]:
            kept = value.name in self.keep_float32
            if value.dtype == (FLOAT16 if kept else FLOAT):
                raise self.postcondition(f"graph {'output' if kept else 'value'} {value.name} is {value.dtype}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = to_float16(model, self.keep_float32, self.mask_value)
        return ir.passes.PassResult(model, True)
