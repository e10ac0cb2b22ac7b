"""unfuse_attention: the ONNX ``Attention`` op (opset 23; the dynamo exporter writes it for sdpa at opset ≥ 23)
rewritten into the explicit ops the graph stage matches (and, through :mod:`unfuse_group_query_attention`,
onnxruntime's ``com.microsoft::GroupQueryAttention`` of onnxruntime-genai builder graphs).

Before: ``Y = Attention(Q, K, V[, attn_mask])`` with 4-D Q [B, Hq, S, D], K [B, Hkv, L, D], V [B, Hkv, L, Dv].
After (the op's definition): K and V repeated to Hq heads when Hkv < Hq (Unsqueeze(axis 2) → Expand
[1, 1, Hq/Hkv, 1, 1] → Reshape [0, Hq, -1, D], head h reads kv head h // (Hq/Hkv)),
``scores = MatMul(Mul(Q, scale), Transpose(K, (0, 1, 3, 2)))``, plus the mask (a float mask added, a
boolean one as ``Where(mask, 0, -inf)`` added), ``Y = MatMul(Softmax(scores, axis=-1), V)``.

Only the form the exporters write is rewritten: 4-D inputs, no past_key/past_value, no present or
qk outputs in use, ``is_causal = 0``, ``softcap = 0``, a static head size. Any other Attention node is left
as it is, with the reason returned (find_attention then names it as a fused op).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes.contracts import GraphPass
from qsvd_export.passes._graph import add_node, initializer, repeat_kv_heads


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _why_not(node: ir.Node) -> str | None:
    """Why ``node`` is outside the rewritten form (None: it can be rewritten)."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    q, k, v = inputs[:3]
    if any(x is None or x.shape is None or x.shape.rank() != 4 for x in (q, k, v)):
        return "Q/K/V are not 4-D [batch, heads, seq, head_dim] (3-D packed heads are not unfused)"
    if len(node.inputs) > 4 and any(x is not None for x in node.inputs[4:]):
        return "past_key/past_value inputs (a cache inside the op)"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "present or qk outputs in use"
    if _attr(node, "is_causal", 0):
        return "is_causal=1"
    if _attr(node, "softcap", 0.0):
        return "softcap"
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim)) or heads % kv_heads:
        return f"head counts {heads} / {kv_heads} / head size {head_dim} are not static multiples"
    return None


def _rewrite(graph: ir.Graph, node: ir.Node, index: int) -> None:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    prefix = f"qsvd/unfused_attention{index}"
    heads, kv_heads, head_dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    scale = float(_attr(node, "scale", 0.0) or 1.0 / np.sqrt(head_dim))
    keys = repeat_kv_heads(graph, k, heads, kv_heads, f"{prefix}/k")
    values = repeat_kv_heads(graph, v, heads, kv_heads, f"{prefix}/v")
    factor = initializer(graph, f"{prefix}/scale", np.asarray(scale, dtype=np.float32))
    scaled = add_node(graph, "Mul", [q, factor], f"{prefix}/q_scaled").outputs[0]
    k_t = add_node(graph, "Transpose", [keys], f"{prefix}/k_t", {"perm": [0, 1, 3, 2]}).outputs[0]
    scores = add_node(graph, "MatMul", [scaled, k_t], f"{prefix}/scores").outputs[0]
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            zero = initializer(graph, f"{prefix}/zero", np.asarray(0.0, dtype=np.float32))
            # a Constant node, as the exporters write it (initializers holding Inf are refused at load)
            minus_inf = add_node(graph, "Constant", [], f"{prefix}/minus_inf",
                                 {"value": ir.tensor(np.asarray(-np.inf, dtype=np.float32))}).outputs[0]
            mask = add_node(graph, "Where", [mask, zero, minus_inf], f"{prefix}/mask_bias").outputs[0]
        scores = add_node(graph, "Add", [scores, mask], f"{prefix}/masked").outputs[0]
    probs = add_node(graph, "Softmax", [scores], f"{prefix}/softmax", {"axis": -1}).outputs[0]
    if mask is not None:  # a fully masked row: NaN from the softmax, 0 after the guard
        nan = add_node(graph, "IsNaN", [probs], f"{prefix}/isnan").outputs[0]
        zero_p = initializer(graph, f"{prefix}/zero_p", np.asarray(0.0, dtype=np.float32))
        probs = add_node(graph, "Where", [nan, zero_p, probs], f"{prefix}/nan_guard").outputs[0]
    out = add_node(graph, "MatMul", [probs, values], f"{prefix}/pv").outputs[0]
    out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
    node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def unfuse_attention(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every default-domain ``Attention`` node of the main graph that has the exporters' form, in
    place (new nodes are appended; sort topologically afterwards). Returns (rewritten, reasons for the rest)."""
    from onnx_ir.passes import common

    graph = model.graph
    found = [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    left = []
    done = 0
    for index, node in enumerate(found):
        why = _why_not(node)
        if why is not None:
            left.append(f"{node.name or 'Attention'}: {why}")
            continue
        _rewrite(graph, node, index)
        done += 1
    from qsvd_export.passes.unfuse_group_query_attention import unfuse_group_query_attention

    gqa_done, gqa_left = unfuse_group_query_attention(model)  # onnxruntime-genai builder graphs
    done += gqa_done
    left += gqa_left
    if done:
        common.TopologicalSortPass()(model)
    return done, left


class UnfuseAttentionPass(GraphPass):
    """:func:`unfuse_attention` as a pass (``self.left``: the reasons for nodes left fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.left: list[str] = []

    def requires(self, model: ir.Model) -> None:
        """ONNX ``Attention`` exists from opset 23: a graph holding it must import that opset."""
        found = next((n for n in model.graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")), None)
        opset = model.opset_imports.get("", 0)
        if found is not None and opset < 23:
            raise self.precondition(f"an ONNX Attention node in an opset-{opset} graph (Attention needs 23)", found)

    def ensures(self, model: ir.Model) -> None:
        """The only Attention nodes left are the ones ``left`` gives a reason for."""
        remaining = sum(1 for n in model.graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx"))
        if remaining != len(self.left):
            raise self.postcondition(f"{remaining} Attention nodes left, {len(self.left)} reasons")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        done, self.left = unfuse_attention(model)
        return ir.passes.PassResult(model, bool(done))
