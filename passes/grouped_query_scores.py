"""``grouped_query_scores``: attention scores over repeated KV heads → one MatMul per KV-head group, no Expand.

Before (HF's ``repeat_kv`` as exporters write it, and as :mod:`latent_kv` rebuilds it from the latent):
``scores = MatMul(Q, Transpose(Reshape(Expand(Unsqueeze(K, [2]), [.., KVH, rep, T, D]), [B, H, T, D]), [0, 1, 3, 2]))``
with Q [B, H, S, D], K [B, KVH, T, D], H = KVH · rep: every cached key is copied ``rep`` times per step.

After: ``scores = Reshape(MatMul(Reshape(Q, [B, KVH, rep·S, D]), Transpose(K, [0, 1, 3, 2])), [B, H, S, T])``.
Query head h reads KV head h // rep in both (the Unsqueeze at axis 2 puts the copies of a KV head next to each
other), so the reshapes only regroup contiguous memory and the scores are the same numbers. The repeat is left to
any other reader (and removed when it has none).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.passes._graph import add_node, const_array, initializer, producer_op
from qsvd_export.passes.contracts import GraphPass


def _int_dims(value: ir.Value | None, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    shape = value.shape if value is not None else None
    if shape is None or shape.rank() <= max(axes):
        return None
    dims = tuple(shape[a] for a in axes)
    return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def _grouping_from_constant(shape: np.ndarray | None, heads: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """(KVH, rep, D) from a constant Expand shape [1, 1, rep, 1, 1] and the repeated heads (H, D)."""
    if shape is None or heads is None or shape.shape != (5,) or [int(d) for d in shape[[0, 1, 3, 4]]] != [1, 1, 1, 1]:
        return None
    rep = int(shape[2])
    return (heads[0] // rep, rep, heads[1]) if rep > 0 and heads[0] % rep == 0 else None


def repeated_key(scores: ir.Node) -> tuple[ir.Value, int, int, int] | None:
    """(K [B, KVH, T, D], KVH, rep, D) when ``scores`` = MatMul(Q, Transpose(repeat_kv(K))) as above, else None."""
    if scores.op_type != "MatMul" or scores.domain not in ("", "ai.onnx") or len(scores.inputs) != 2:
        return None
    transpose = producer_op(scores.inputs[1], "Transpose")
    perm = transpose.attributes.get("perm") if transpose is not None else None
    reshape = producer_op(transpose.inputs[0], "Reshape") if transpose is not None else None
    expand = producer_op(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = producer_op(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if perm is None or list(perm.as_ints()) != [0, 1, 3, 2] or unsqueeze is None:
        return None
    axes = const_array(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    key = unsqueeze.inputs[0]
    heads = _int_dims(reshape.outputs[0], (1, 3))
    grouped = _int_dims(expand.outputs[0], (1, 2, 4)) or _grouping_from_constant(const_array(expand.inputs[1]), heads)
    query = _int_dims(scores.inputs[0], (1, 3))
    if axes is None or [int(a) for a in np.ravel(axes)] != [2] or key is None or grouped is None or heads is None \
            or query is None:
        return None
    kv_heads, rep, dim = grouped  # K [B, KVH, T, D] (its own shape may be unknown: the Expand's says it)
    if key.shape is not None and _int_dims(key, (1, 3)) != (kv_heads, dim) \
            or heads != (kv_heads * rep, dim) or query != heads or rep < 2:
        return None
    return key, kv_heads, rep, dim


class GroupedQueryScoresPass(GraphPass):
    """requires: a closed graph (a graph without repeated keys is left as it is). ensures: no score MatMul it matched
    reads a repeat."""

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0

    def requires(self, model: ir.Model) -> None:
        self.require_closed_graph(model)

    def ensures(self, model: ir.Model) -> None:
        outputs = {id(v) for v in model.graph.outputs}
        left = [n for n in model.graph if repeated_key(n) is not None and id(n.outputs[0]) not in outputs]
        if left:
            raise self.postcondition("a score MatMul still reads repeated keys", left[0])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = {id(v) for v in graph.outputs}
        matches = [(n, m) for n in graph if id(n.outputs[0]) not in outputs and (m := repeated_key(n)) is not None]
        for scores, (key, kv_heads, rep, dim) in matches:
            prefix = f"{scores.name or 'scores'}/grouped"
            query = scores.inputs[0]
            grouped_shape = initializer(graph, f"{prefix}/query_shape", np.asarray([0, kv_heads, -1, dim], np.int64))
            grouped = add_node(graph, "Reshape", [query, grouped_shape], f"{prefix}/query").outputs[0]
            key_t = add_node(graph, "Transpose", [key], f"{prefix}/key_t", {"perm": [0, 1, 3, 2]}).outputs[0]
            product = add_node(graph, "MatMul", [grouped, key_t], f"{prefix}/matmul").outputs[0]
            heads_shape = initializer(graph, f"{prefix}/scores_shape", np.asarray([0, kv_heads * rep, -1, 0], np.int64))
            out = add_node(graph, "Reshape", [product, heads_shape], f"{prefix}/scores").outputs[0]
            for value in (grouped, key_t, product, out):
                value.dtype = query.dtype  # type: ignore[union-attr]
            out.shape = scores.outputs[0].shape
            scores.outputs[0].replace_all_uses_with(out)
            self.rewritten += 1
        if self.rewritten:
            common.RemoveUnusedNodesPass()(model)
            graph.sort()
        return ir.passes.PassResult(model, bool(self.rewritten))
