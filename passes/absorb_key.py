"""absorb_key: for attention without RoPE, score queries against the latent instead of rebuilt keys.

Without a position-dependent rotation between the key projection and Q·Kᵀ, per query head h
(kv group g(h)): Q_h·K_hᵀ = (Q_h·U_k,h)·Cᵀ + Q_h·b_k,h. The second term is the same for every key
of a query row, so softmax ignores it (only applied when the score path has no Tanh soft-capping).
The rewrite: ``Q̃ = Q·W̃`` with W̃ [Hkv, D, r] the per-group key up-projections (one batched MatMul), then
``scores = MatMul(Q̃, Transpose(Unsqueeze(C, 1)))`` [B, H, S, T], replacing the Q·Kᵀ MatMul. This is
the MLA-style absorption; rebuilt keys are no longer computed at all.

Applies only where verified: the K chain is Reshape [.., Hkv, D] → Transpose (0, 2, 1, 3) (no RoPE,
no norm), and between the cache and Q·Kᵀ there is Transpose (0, 1, 3, 2), optionally after the
repeat_kv pattern Unsqueeze(axis 2) → Expand → Reshape.
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


class AbsorbKeyPass(LatentLayerPass):
    applied_note = "K up-projection absorbed into the queries"
    skipped_note = "K up-projection not absorbed"

    def apply(self, graph: ir.Graph, index: int, rewrite: LayerRewrite) -> None:
        chain = rewrite.chains.get("k", [])
        if [n.op_type for n in chain] != ["Reshape", "Transpose"]:
            raise Decline("keys are rotated or normalized per position (RoPE / k-norm): they must be rebuilt")
        kv_heads, head_dim = head_chain(chain, "K")
        block = rewrite.block
        up, bias = rewrite.full_ups["k"]  # [r, Ek]
        score_path = path_nodes(block.scores.outputs[0], block.softmax.inputs[0]) or []
        if bias is not None and any(n.op_type == "Tanh" for n in score_path):
            raise Decline("soft-capped scores with a key bias")
        nodes = topo_order(path_nodes(rewrite.rebuilt["k"], block.scores.inputs[1]) or [], graph)
        if [n.op_type for n in nodes] == ["Transpose"]:
            heads = kv_heads
        elif len(nodes) == 4 and nodes[-1].op_type == "Transpose":
            heads = repeat_heads(nodes[:3], kv_heads)
        else:
            raise Decline(f"between the K cache and Q·Kᵀ: {[n.op_type for n in nodes]}")
        if list(nodes[-1].attributes["perm"].value) != [0, 1, 3, 2]:
            raise Decline("keys are not transposed (0, 1, 3, 2) for Q·Kᵀ")
        prefix = f"qsvd/layer{index}/absorb_key"
        stacked = per_kv_head(up, kv_heads, head_dim).transpose(0, 2, 1)  # [Hkv, D, r]
        scores = block.scores
        w = initializer(graph, f"{prefix}/up_groups", np.ascontiguousarray(stacked, dtype=np.float32))
        q_latent = grouped_head_matmul(graph, scores.inputs[0], w, heads, kv_heads, up.shape[0], f"{prefix}/queries")
        axes = initializer(graph, f"{prefix}/axes", np.asarray([1], dtype=np.int64))
        latent4 = add_node(graph, "Unsqueeze", [rewrite.latent_all, axes], f"{prefix}/latent4").outputs[0]
        keys = add_node(graph, "Transpose", [latent4], f"{prefix}/latent_t", {"perm": [0, 1, 3, 2]}).outputs[0]
        out = add_node(graph, "MatMul", [q_latent, keys], f"{prefix}/scores").outputs[0]
        out.dtype = scores.outputs[0].dtype
        out.shape = scores.outputs[0].shape
        scores.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
