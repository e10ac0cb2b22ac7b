"""absorb_key: for attention without RoPE, score queries against the latent instead of rebuilt keys.

Without a position-dependent rotation between the key projection and Q·Kᵀ, per query head h
(kv group g(h)): Q_h·K_hᵀ = (Q_h·U_k,h)·Cᵀ + Q_h·b_k,h. The second term is the same for every key
of a query row, so softmax ignores it (only applied when the score path has no Tanh soft-capping).
The rewrite: ``Q̃ = MatMul(Q, W̃)`` with W̃ [H, D, r] the stacked per-head key up-projections, then
``scores = MatMul(Q̃, Transpose(Unsqueeze(C, 1)))`` [B, H, S, T], replacing the Q·Kᵀ MatMul. This is
the MLA-style absorption; rebuilt keys are no longer computed at all.

Applies only where verified: the K chain is Reshape [.., Hkv, D] → Transpose (0, 2, 1, 3) (no RoPE,
no norm), and between the cache and Q·Kᵀ there is Transpose (0, 1, 3, 2), optionally after the
repeat_kv pattern Unsqueeze(axis 2) → Expand → Reshape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, const_array, initializer, path_nodes, topo_order
from qsvd_export.passes.context import GraphStageContext, LayerRewrite


class _Skip(Exception):
    pass


def _scores_path_has(block, op: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether an ``op`` node sits between the Q·Kᵀ MatMul and the Softmax."""
    nodes = path_nodes(block.scores.outputs[0], block.softmax.inputs[0]) or []
    return any(n.op_type == op for n in nodes)


class AbsorbKeyPass(ir.passes.InPlacePass):
    def __init__(self, context: GraphStageContext) -> None:
        super().__init__()
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for index, rewrite in sorted(self.context.layers.items()):
            if rewrite.cache != "latent" or "k" not in rewrite.rebuilt:
                continue
            try:
                kv_heads, head_dim, heads = self._verify(model.graph, rewrite)
            except _Skip as reason:
                rewrite.notes.append(f"K up-projection not absorbed: {reason}")
                continue
            self._absorb(model.graph, index, rewrite, kv_heads, head_dim, heads)
            rewrite.notes.append("K up-projection absorbed into the queries")
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _verify(graph: ir.Graph, rewrite: LayerRewrite) -> tuple[int, int, int]:
        chain = rewrite.chains.get("k", [])
        if [n.op_type for n in chain] != ["Reshape", "Transpose"]:
            raise _Skip("keys are rotated or normalized per position (RoPE / k-norm): they must be rebuilt")
        reshape, transpose = chain
        shape = reshape.outputs[0].shape
        if shape is None or shape.rank() != 4 or not all(isinstance(d, int) for d in list(shape)[2:]):
            raise _Skip("K head reshape without static [heads, head_dim]")
        if list(transpose.attributes["perm"].value) != [0, 2, 1, 3]:
            raise _Skip("K transpose is not (0, 2, 1, 3)")
        kv_heads, head_dim = int(shape[2]), int(shape[3])
        block = rewrite.block
        _, bias = rewrite.full_ups["k"]
        if bias is not None and _scores_path_has(block, "Tanh"):
            raise _Skip("soft-capped scores with a key bias")
        nodes = topo_order(path_nodes(rewrite.rebuilt["k"], block.scores.inputs[1]) or [], graph)
        ops = [n.op_type for n in nodes]
        if ops == ["Transpose"]:
            heads = kv_heads
        elif ops == ["Unsqueeze", "Expand", "Reshape", "Transpose"]:
            axes = const_array(nodes[0].inputs[1]) if len(nodes[0].inputs) > 1 else None
            out_shape = nodes[2].outputs[0].shape
            if axes is None or [int(a) for a in np.atleast_1d(axes)] != [2] or out_shape is None \
                    or not isinstance(out_shape[1], int):
                raise _Skip("unrecognised repeat_kv layout")
            heads = int(out_shape[1])
        else:
            raise _Skip(f"between the K cache and Q·Kᵀ: {ops}")
        if list(nodes[-1].attributes["perm"].value) != [0, 1, 3, 2]:
            raise _Skip("keys are not transposed (0, 1, 3, 2) for Q·Kᵀ")
        if heads % kv_heads:
            raise _Skip("query heads are not a multiple of kv heads")
        return kv_heads, head_dim, heads

    @staticmethod
    def _absorb(graph: ir.Graph, index: int, rewrite: LayerRewrite, kv_heads: int, head_dim: int, heads: int) -> None:
        prefix = f"qsvd/layer{index}/absorb_key"
        up, _ = rewrite.full_ups["k"]  # [r, Ek]
        rep = heads // kv_heads
        stacked = np.stack([up[:, (h // rep) * head_dim:(h // rep + 1) * head_dim].T for h in range(heads)])  # [H, D, r]
        scores = rewrite.block.scores
        w = initializer(graph, f"{prefix}/up_heads", stacked.astype(np.float32))
        q_latent = add_node(graph, "MatMul", [scores.inputs[0], w], f"{prefix}/queries").outputs[0]
        axes = initializer(graph, f"{prefix}/axes", np.asarray([1], dtype=np.int64))
        latent4 = add_node(graph, "Unsqueeze", [rewrite.latent_all, axes], f"{prefix}/latent4").outputs[0]
        keys = add_node(graph, "Transpose", [latent4], f"{prefix}/latent_t", {"perm": [0, 1, 3, 2]}).outputs[0]
        out = add_node(graph, "MatMul", [q_latent, keys], f"{prefix}/scores").outputs[0]
        out.dtype = scores.outputs[0].dtype
        out.shape = scores.outputs[0].shape
        scores.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
