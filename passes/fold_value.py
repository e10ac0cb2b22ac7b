"""fold_value: apply V's up-projection after the attention weights instead of before.

After latent_kv, V for all T tokens is rebuilt every step: V = C·U_vᵀ (+b_v), [T, Ev] from the latent
C [T, r] — T·r·Ev multiply-adds per layer and step. Since softmax rows sum to one,
P·V = (P·C)·U_v,hᵀ (+ b_v,h) per query head h (kv group g(h)), which costs H·T·r + H·r·D instead.
The rewrite: ``PC = MatMul(P, Unsqueeze(C, 1))`` [B, H, S, r], then one batched MatMul per kv group
with the stacked up-projections [Hkv, r, D] (+ per-head bias) replaces the P·V MatMul.

Applies only where the structure is verified: the V chain is Reshape [.., Hkv, D] → Transpose
(0, 2, 1, 3), and between the cache and P·V there is nothing (MHA) or the repeat_kv pattern
Unsqueeze(axis 2) → Expand → Reshape [B, H, T, D] (head h reads kv group h // (H / Hkv)).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, initializer, path_nodes, topo_order
from qsvd_export.passes.contracts import Decline
from qsvd_export.passes._latent_layer import (
    LatentLayerPass, grouped_head_matmul, head_chain, per_kv_head, repeat_heads,
)
from qsvd_export.passes.context import LayerRewrite


class FoldValuePass(LatentLayerPass):
    applied_note = "V up-projection applied after attention weights"
    skipped_note = "V up-projection not folded"

    def apply(self, graph: ir.Graph, index: int, rewrite: LayerRewrite) -> None:
        kv_heads, head_dim = head_chain(rewrite.chains.get("v", []), "V")
        pv = rewrite.block.pv
        nodes = topo_order(path_nodes(rewrite.rebuilt["v"], pv.inputs[1]) or [], graph)
        if pv.inputs[1] is rewrite.rebuilt["v"]:
            heads = kv_heads
        elif len(nodes) == 3:
            heads = repeat_heads(nodes, kv_heads)
        else:
            raise Decline(f"between the V cache and P·V: {[n.op_type for n in nodes]}")
        prefix = f"qsvd/layer{index}/fold_value"
        up, bias = rewrite.full_ups["v"]  # [r, Ev], [Ev] or None
        axes = initializer(graph, f"{prefix}/axes", np.asarray([1], dtype=np.int64))
        latent4 = add_node(graph, "Unsqueeze", [rewrite.latent_all, axes], f"{prefix}/latent4").outputs[0]
        weighted = add_node(graph, "MatMul", [pv.inputs[0], latent4], f"{prefix}/weighted_latent").outputs[0]
        w = initializer(graph, f"{prefix}/up_groups", per_kv_head(up, kv_heads, head_dim).astype(np.float32))
        out = grouped_head_matmul(graph, weighted, w, heads, kv_heads, head_dim, prefix)
        if bias is not None:
            rep = heads // kv_heads
            b = np.repeat(per_kv_head(bias[None, :], kv_heads, head_dim), rep, axis=0)  # [H, 1, D]
            out = add_node(graph, "Add", [out, initializer(graph, f"{prefix}/bias_heads", b.astype(np.float32))],
                           f"{prefix}/heads_bias").outputs[0]
        out.dtype = pv.outputs[0].dtype
        out.shape = pv.outputs[0].shape
        pv.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
