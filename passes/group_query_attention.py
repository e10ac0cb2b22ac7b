"""fuse_group_query_attention: each dense-cache attention core → ``com.microsoft.GroupQueryAttention`` (cpu).

The exported core of a decode step copies the whole cache every token: ``Concat(past, new)`` writes the
present cache, ``Unsqueeze → Expand → Reshape`` repeats K and V to the query heads, then QKᵀ, scale, the
additive mask, Softmax and P·V. onnxruntime's GroupQueryAttention kernel appends the new rows and reads
each KV head once for its query group (``benchmarks/attention_micro``: 1.5–1.8× faster per layer).

Matched per :class:`~passes.find_attention.AttentionBlock` with a K and a V cache ``Concat``:
- Q = the scores MatMul's first input [B, H, S, D] (RoPE applied), K/V new = the Concats' new inputs
  [B, KVH, S, D]; K reaches the scores and V the P·V MatMul only through Unsqueeze/Expand/Reshape/Transpose;
- between scores and Softmax only ``Mul``/``Div`` by a constant scalar (the scale) and one ``Add`` of a
  mask that does not depend on the scores.
Replaced by Transpose/Reshape to [B, S, ·] layouts, the GQA node (``scale`` from the graph, no rotary inside)
and a Reshape/Transpose of its output back to [B, H, S, D]; the present cache outputs keep their names.

Contract change, stated by the caller: GQA applies the causal mask itself and takes the valid length of
each row from ``attention_mask`` (``seqlens_k = Σ mask − 1``, ``total_sequence_length`` = its width), so
rows may be right-padded but not left-padded, and a mask with a sliding window is not representable: the
caller fuses only models whose attention is plain causal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.passes._graph import add_node, const_array, initializer
from qsvd_export.passes.find_attention import AttentionBlock, find_attention

_MOVES = {"Unsqueeze", "Expand", "Reshape", "Transpose"}


@dataclass
class FusionReport:
    fused: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # softmax node → reason

    def as_dict(self) -> dict[str, object]:
        return {"group_query_attention": self.fused, "not_fused": dict(sorted(self.skipped.items()))}


def _reaches_through_moves(value: ir.Value, source: ir.Value) -> bool:
    """Whether ``value`` is ``source`` after data-movement ops only (shape inputs aside)."""
    while value is not source:
        node = value.producer()
        if node is None or node.op_type not in _MOVES or node.inputs[0] is None:
            return False
        value = node.inputs[0]
    return True


def _score_scale(block: AttentionBlock) -> float | None:
    """The constant factor between QKᵀ and Softmax when the path is scale ops and one mask Add, else None."""
    scores = block.scores.outputs[0]
    value, scale, masks = block.softmax.inputs[0], 1.0, 0
    while value is not scores:
        node = value.producer()
        if node is None or len(node.inputs) != 2:
            return None
        a, b = node.inputs
        if node.op_type in ("Mul", "Div"):
            constant = const_array(b)
            if constant is None or constant.size != 1:
                return None
            factor = float(constant.reshape(()))
            scale *= factor if node.op_type == "Mul" else 1.0 / factor
            value = a  # type: ignore[assignment]
        elif node.op_type == "Add" and masks == 0:
            masks += 1
            value = a if _depends_on(a, scores) else b  # type: ignore[assignment]
            other = b if value is a else a
            if other is None or _depends_on(other, scores):
                return None
        else:
            return None
    return scale


def _depends_on(value: ir.Value | None, target: ir.Value, limit: int = 64) -> bool:
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if current is target:
            return True
        seen.add(id(current))
        node = current.producer()
        if node is not None:
            stack.extend(node.inputs)
    return False


def _dims(value: ir.Value) -> tuple[int, int] | None:
    """(heads, head_dim) of a [B, heads, S, D] value with static heads and D."""
    shape = value.shape
    if shape is None or shape.rank() != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return None
    return int(shape[1]), int(shape[3])


class _Lengths:
    """``seqlens_k`` int32 [B] and ``total_sequence_length`` int32 scalar from ``attention_mask``, made once."""

    def __init__(self, graph: ir.Graph, mask: ir.Value) -> None:
        self.graph, self.mask, self.values = graph, mask, None

    def get(self) -> tuple[ir.Value, ir.Value]:
        if self.values is None:
            g = self.graph
            axis = initializer(g, "qsvd/gqa/axis1", np.asarray([1], dtype=np.int64))
            valid = add_node(g, "ReduceSum", [self.mask, axis], "qsvd/gqa/valid", {"keepdims": 0}).outputs[0]
            one = initializer(g, "qsvd/gqa/one", np.asarray(1, dtype=np.int64))
            last = add_node(g, "Sub", [valid, one], "qsvd/gqa/last").outputs[0]
            seqlens = add_node(g, "Cast", [last], "qsvd/gqa/seqlens_k", {"to": ir.DataType.INT32}).outputs[0]
            width = add_node(g, "Shape", [self.mask], "qsvd/gqa/width_1d", {"start": 1, "end": 2}).outputs[0]
            zero = initializer(g, "qsvd/gqa/axis0", np.asarray([0], dtype=np.int64))
            scalar = add_node(g, "Squeeze", [width, zero], "qsvd/gqa/width").outputs[0]
            total_len = add_node(g, "Cast", [scalar], "qsvd/gqa/total_sequence_length",
                                 {"to": ir.DataType.INT32}).outputs[0]
            self.values = (seqlens, total_len)
        return self.values


def _flatten_heads(graph: ir.Graph, value: ir.Value, width: int, name: str) -> ir.Value:
    """[B, N, S, D] → [B, S, N·D]."""
    moved = add_node(graph, "Transpose", [value], f"{name}/bsnd", {"perm": [0, 2, 1, 3]}).outputs[0]
    shape = initializer(graph, f"{name}/shape", np.asarray([0, 0, width], dtype=np.int64))
    return add_node(graph, "Reshape", [moved, shape], f"{name}/flat").outputs[0]


def fuse_group_query_attention(model: ir.Model) -> FusionReport:
    """Rewrite the attention cores of ``model`` in place (module doc); returns what was fused or why not."""
    graph = model.graph
    report = FusionReport()
    masks = [v for v in graph.inputs if v.name == "attention_mask"]
    found = find_attention(model)
    blocks = found.blocks
    report.skipped.update({f.softmax: f"no attention block matched: {f.reason}" for f in found.failures})
    if not masks:
        report.skipped.update({b.softmax.name: "no attention_mask graph input" for b in blocks})
        return report
    lengths = _Lengths(graph, masks[0])
    for block in blocks:
        reason = _unfusable(block)
        if reason:
            report.skipped[block.softmax.name] = reason
            continue
        _fuse(graph, block, lengths, report.fused)
        report.fused += 1
    if report.fused:
        common.RemoveUnusedNodesPass()(model)
        graph.sort()
        model.opset_imports.setdefault("com.microsoft", 1)
    return report


def _unfusable(block: AttentionBlock) -> str | None:
    k_cache, v_cache = block.k_cache, block.v_cache
    if k_cache is None or v_cache is None:
        return "no K/V cache Concat (latent cache or no cache)"
    q_dims, k_dims, v_dims = _dims(block.scores.inputs[0]), _dims(k_cache.new), _dims(v_cache.new)  # type: ignore[arg-type]
    if q_dims is None or k_dims is None or v_dims is None or k_cache.axis != 2 or v_cache.axis != 2:
        return "Q/K/V are not [batch, heads, seq, head_dim] with static heads and head_dim"
    if not (q_dims[1] == k_dims[1] == v_dims[1]) or k_dims[0] != v_dims[0] or q_dims[0] % k_dims[0]:
        return f"head geometry Q {q_dims}, K {k_dims}, V {v_dims} is not grouped-query attention"
    if not _reaches_through_moves(block.scores.inputs[1], k_cache.present):  # type: ignore[arg-type]
        return "K reaches QKᵀ through more than data movement"
    if not _reaches_through_moves(block.pv.inputs[1], v_cache.present):  # type: ignore[arg-type]
        return "V reaches P·V through more than data movement"
    if _score_scale(block) is None:
        return "between QKᵀ and Softmax there is more than a constant scale and one additive mask"
    return None


def _fuse(graph: ir.Graph, block: AttentionBlock, lengths: _Lengths, index: int) -> None:
    k_cache, v_cache = block.k_cache, block.v_cache
    assert k_cache is not None and v_cache is not None
    q = block.scores.inputs[0]
    assert q is not None
    heads, dim = _dims(q)  # type: ignore[misc]
    kv_heads = _dims(k_cache.new)[0]  # type: ignore[index]
    name = f"qsvd/gqa{index}"
    query = _flatten_heads(graph, q, heads * dim, f"{name}/query")
    key = _flatten_heads(graph, k_cache.new, kv_heads * dim, f"{name}/key")
    value = _flatten_heads(graph, v_cache.new, kv_heads * dim, f"{name}/value")
    seqlens, total = lengths.get()
    node = add_node(graph, "GroupQueryAttention", [query, key, value, k_cache.past, v_cache.past, seqlens, total],
                    name, {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(_score_scale(block))},
                    num_outputs=3, domain="com.microsoft")
    output, present_key, present_value = node.outputs
    split = initializer(graph, f"{name}/heads", np.asarray([0, 0, heads, dim], dtype=np.int64))
    grid = add_node(graph, "Reshape", [output, split], f"{name}/bshd").outputs[0]
    back = add_node(graph, "Transpose", [grid], f"{name}/bhsd", {"perm": [0, 2, 1, 3]}).outputs[0]
    back.dtype, back.shape = block.pv.outputs[0].dtype, block.pv.outputs[0].shape
    block.pv.outputs[0].replace_all_uses_with(back)
    for cache, fresh in ((k_cache, present_key), (v_cache, present_value)):
        old = cache.present
        fresh.dtype, fresh.shape = old.dtype, old.shape
        old.replace_all_uses_with(fresh, replace_graph_outputs=True)
        final = old.name
        old.name = f"{final}/unfused"
        fresh.name = final
