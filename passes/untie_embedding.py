"""``untie_embedding``: an embedding Gather read through a Transpose of a constant → a Gather of its own table.

onnxruntime-genai's model builder ties a model's input embedding to its output head by storing the head's
weight ``W`` [hidden, vocab] once and reading the embedding as ``Gather(Transpose(W), input_ids)``. Quantized
for QNN HTP, the weight's DequantizeLinear then feeds a float Transpose that no QDQ node unit takes, and the
graph does not compile ("Unsupported nodes in QNN EP: DequantizeLinear"). The npu target's static graphs get the
table ``Wᵀ`` as its own initializer, so the Gather reads a constant directly, as in the project's own exports.

Contract: for every ``Gather`` whose data input is ``Transpose(perm=[1, 0])`` of a 2-D initializer, the data
input becomes an initializer holding the transposed array (one per source weight, shared by every such
Gather). The Transpose goes when nothing else reads it. Outputs are bit-identical.
"""

from __future__ import annotations

import onnx_ir as ir

from qsvd_export.passes.contracts import GraphPass

_SUFFIX = "_untied_embedding"


def _transposed_weight(node: ir.Node) -> ir.Value | None:
    """The 2-D initializer a Gather ``node`` reads through ``Transpose(perm=[1, 0])``, if it does."""
    data = node.inputs[0] if node.inputs else None
    transpose = data.producer() if data is not None else None
    if transpose is None or transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx"):
        return None
    weight = transpose.inputs[0]
    perm = transpose.attributes.get("perm")
    if weight is None or not weight.is_initializer() or weight.const_value is None:
        return None
    if len(weight.const_value.shape) != 2:
        return None
    return weight if perm is None or list(perm.as_ints()) == [1, 0] else None


def untie_embeddings(model: ir.Model) -> list[str]:
    """Give every Gather of a transposed constant its own table, in place; returns the new initializers' names."""
    tables: dict[int, ir.Value] = {}
    for node in list(model.graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        weight = _transposed_weight(node)
        if weight is None:
            continue
        if id(weight) not in tables:
            name = f"{weight.name}{_SUFFIX}"
            array = weight.const_value.numpy().T.copy()
            table = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(weight.dtype),
                             const_value=ir.tensor(array, name=name))
            model.graph.register_initializer(table)
            tables[id(weight)] = table
        node.replace_input_with(0, tables[id(weight)])
    if tables:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return [table.name or "" for table in tables.values()]


class UntieEmbeddingPass(GraphPass):
    """:func:`untie_embeddings` as a pass (``self.untied``). requires: every node input is produced by a node,
    a graph input or an initializer. ensures: no Gather reads a transposed constant."""

    def __init__(self) -> None:
        super().__init__()
        self.untied: list[str] = []

    def requires(self, model: ir.Model) -> None:
        self.require_closed_graph(model)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "Gather" and _transposed_weight(node) is not None:
                raise self.postcondition("a Gather still reads a transposed constant", node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.untied = untie_embeddings(model)
        return ir.passes.PassResult(model, bool(self.untied))
