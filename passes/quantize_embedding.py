"""``quantize_embedding``: a float table read only by ``Gather`` → ``com.microsoft.GatherBlockQuantized``.

After :mod:`quantize_weights` gives the tied lm_head its own packed copy, the fp32 embedding table is
read only by the token ``Gather``: one row per token, but all of it on disk and in memory (smollm2:
113 MB of a 212 MB w4a8 bundle). This pass stores it as uint8 blocks along the hidden axis (8 bits,
symmetric: zero point 128, signed block scale as in :func:`qsvd_export.quant.matmul_nbits.quantize_blockwise`)
and gathers + dequantizes the requested rows on the fly. Contract of the op (ONNX Runtime contrib,
CPU EP): ``data`` uint8 [V, E], ``indices`` int64, ``scales`` float32 [V, ceil(E / block)],
``zero_points`` uint8 like scales; ``gather_axis`` 0, ``quantize_axis`` 1, ``bits`` 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import convert_attributes
from onnx_ir.passes import common

from qsvd_export.passes.contracts import GraphPass
from qsvd_export.quant.matmul_nbits import quantize_blockwise
from qsvd_export.passes._graph import initializer

MS_DOMAIN = "com.microsoft"


@dataclass
class EmbeddingQuantReport:
    quantized: list[str] = field(default_factory=list)
    float_bytes: int = 0
    packed_bytes: int = 0

    def as_dict(self) -> dict:
        return {"quantized_embeddings": len(self.quantized), "embedding_float_bytes": self.float_bytes,
                "embedding_packed_bytes": self.packed_bytes}


def _gathered_table(node: ir.Node) -> ir.Value | None:
    """The float32 [V, E] initializer ``node`` gathers rows of, if every reader of it is such a Gather."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return None
    table = node.inputs[0]
    if table is None or table.const_value is None or len(table.shape or ()) != 2 or table.dtype != ir.DataType.FLOAT:
        return None
    for user, _ in table.uses():
        axis = user.attributes.get("axis")
        if user.op_type != "Gather" or user.inputs[0] is not table or (axis is not None and axis.value != 0):
            return None
    return table


class QuantizeEmbeddingPass(GraphPass):
    """Replace row gathers from float tables by 8-bit GatherBlockQuantized (``block`` values per scale)."""

    def __init__(self, block: int = 32, report: EmbeddingQuantReport | None = None) -> None:
        super().__init__()
        self.block = block
        self.report = report if report is not None else EmbeddingQuantReport()

    def requires(self, model: ir.Model) -> None:
        """GatherBlockQuantized takes blocks of a power of two ≥ 16."""
        if self.block < 16 or self.block & (self.block - 1):
            raise self.precondition(f"block size {self.block} (a power of two, at least 16)")

    def ensures(self, model: ir.Model) -> None:
        """No float table read only by row Gathers, at least ``block`` wide, is left."""
        for node in model.graph:
            table = _gathered_table(node)
            if table is not None and (table.shape[1] or 0) >= self.block:
                raise self.postcondition(f"float table {table.name!r} is still gathered", node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        common.RemoveUnusedNodesPass()(model)  # e.g. the Transpose a quantized tied lm_head left without readers
        graph = model.graph
        packed: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        changed = False
        for node in list(graph):
            table = _gathered_table(node)
            if table is None or (table.shape[1] or 0) < self.block:
                continue
            if table.name not in packed:
                weight = table.const_value.numpy()
                vocab, width = weight.shape
                quant = quantize_blockwise(weight.T, 8, self.block, symmetric=True)  # blocks along E, per row
                data = quant.q.reshape(vocab, -1)[:, :width]
                base = f"{table.name}/q8"
                packed[table.name] = (initializer(graph, f"{base}/data", np.ascontiguousarray(data)),
                                      initializer(graph, f"{base}/scales", quant.scales),
                                      initializer(graph, f"{base}/zero_points", quant.zeros))
                self.report.quantized.append(table.name)
                self.report.float_bytes += weight.nbytes
                self.report.packed_bytes += data.nbytes + quant.scales.nbytes + quant.zeros.nbytes
            data, scales, zeros = packed[table.name]
            new = ir.Node(MS_DOMAIN, "GatherBlockQuantized", [data, node.inputs[1], scales, zeros],
                          name=f"{node.name}/q8", attributes=convert_attributes(
                              {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block, "bits": 8}))
            old, out = node.outputs[0], new.outputs[0]
            out.shape, out.dtype, out.name = old.shape, ir.DataType.FLOAT, old.name
            old.name = f"{old.name}/float"
            graph.insert_after(node, new)
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            changed = True
        for name in packed:  # the float tables now have no readers
            value = graph.initializers.get(name)
            if value is not None and not value.uses() and value not in graph.outputs:
                graph.initializers.pop(name)
        if changed:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, changed)
