"""fold_value: apply V's up-projection after the attention weights instead of before.

After latent_kv, V for all T tokens is rebuilt every step: V = C·U_vᵀ (+b_v), [T, Ev] from the latent
C [T, r] — T·r·Ev multiply-adds per layer and step. Since softmax rows sum to one,
P·V = (P·C)·U_v,hᵀ (+ b_v,h) per query head h (kv group g(h)), which costs H·T·r + H·r·D instead.
The rewrite: ``PC = MatMul(P, Unsqueeze(C, 1))`` [B, H, S, r], then one batched MatMul with the
stacked per-head up-projections [H, r, D] (+ per-head bias) replaces the P·V MatMul.

Applies only where the structure is verified: the V chain is Reshape [.., Hkv, D] → Transpose
(0, 2, 1, 3), and between the cache and P·V there is nothing (MHA) or the repeat_kv pattern
Unsqueeze(axis 2) → Expand → Reshape [B, H, T, D] (head h reads kv group h // (H / Hkv)).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, const_array, initializer, path_nodes, topo_order
from qsvd_export.passes.context import GraphStageContext, LayerRewrite


class _Skip(Exception):
    pass


class FoldValuePass(ir.passes.InPlacePass):
    def __init__(self, context: GraphStageContext) -> None:
        super().__init__()
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for index, rewrite in sorted(self.context.layers.items()):
            if rewrite.cache != "latent" or "v" not in rewrite.rebuilt:
                continue
            try:
                kv_heads, head_dim, heads = self._verify(model.graph, rewrite)
            except _Skip as reason:
                rewrite.notes.append(f"V up-projection not folded: {reason}")
                continue
            self._fold(model.graph, index, rewrite, kv_heads, head_dim, heads)
            rewrite.notes.append("V up-projection applied after attention weights")
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _verify(graph: ir.Graph, rewrite: LayerRewrite) -> tuple[int, int, int]:
        chain = rewrite.chains.get("v", [])
        if [n.op_type for n in chain] != ["Reshape", "Transpose"]:
            raise _Skip(f"V chain is {[n.op_type for n in chain]}, not Reshape → Transpose")
        reshape, transpose = chain
        shape = reshape.outputs[0].shape
        if shape is None or shape.rank() != 4 or not all(isinstance(d, int) for d in list(shape)[2:]):
            raise _Skip("V head reshape without static [heads, head_dim]")
        if list(transpose.attributes["perm"].value) != [0, 2, 1, 3]:
            raise _Skip("V transpose is not (0, 2, 1, 3)")
        kv_heads, head_dim = int(shape[2]), int(shape[3])
        pv = rewrite.block.pv
        v_all = rewrite.rebuilt["v"]
        if pv.inputs[1] is v_all:
            return kv_heads, head_dim, kv_heads
        nodes = topo_order(path_nodes(v_all, pv.inputs[1]) or [], graph)
        if [n.op_type for n in nodes] != ["Unsqueeze", "Expand", "Reshape"]:
            raise _Skip(f"between the V cache and P·V: {[n.op_type for n in nodes]}")
        axes = const_array(nodes[0].inputs[1]) if len(nodes[0].inputs) > 1 else None
        if axes is None or [int(a) for a in np.atleast_1d(axes)] != [2]:
            raise _Skip("repeat_kv unsqueezes another axis")
        out_shape = nodes[2].outputs[0].shape
        if out_shape is None or out_shape.rank() != 4 or not isinstance(out_shape[1], int):
            raise _Skip("repeat_kv output heads unknown")
        heads = int(out_shape[1])
        if heads % kv_heads:
            raise _Skip("query heads are not a multiple of kv heads")
        return kv_heads, head_dim, heads

    @staticmethod
    def _fold(graph: ir.Graph, index: int, rewrite: LayerRewrite, kv_heads: int, head_dim: int, heads: int) -> None:
        prefix = f"qsvd/layer{index}/fold_value"
        up, bias = rewrite.full_ups["v"]  # [r, Ev], [Ev] or None
        rep = heads // kv_heads
        stacked = np.stack([up[:, (h // rep) * head_dim:(h // rep + 1) * head_dim] for h in range(heads)])
        axes = initializer(graph, f"{prefix}/axes", np.asarray([1], dtype=np.int64))
        latent4 = add_node(graph, "Unsqueeze", [rewrite.latent_all, axes], f"{prefix}/latent4").outputs[0]
        pv = rewrite.block.pv
        weighted = add_node(graph, "MatMul", [pv.inputs[0], latent4], f"{prefix}/weighted_latent").outputs[0]
        w = initializer(graph, f"{prefix}/up_heads", stacked.astype(np.float32))
        out = add_node(graph, "MatMul", [weighted, w], f"{prefix}/heads").outputs[0]
        if bias is not None:
            b = np.stack([bias[(h // rep) * head_dim:(h // rep + 1) * head_dim] for h in range(heads)])[:, None, :]
            out = add_node(graph, "Add", [out, initializer(graph, f"{prefix}/bias_heads", b.astype(np.float32))],
                           f"{prefix}/heads_bias").outputs[0]
        out.dtype = pv.outputs[0].dtype
        out.shape = pv.outputs[0].shape
        pv.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
