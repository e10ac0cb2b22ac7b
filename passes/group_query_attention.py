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

from qsvd_export.passes._graph import add_node, backward_nodes, const_array, initializer
from qsvd_export.latent_layout import LatentLayer
from qsvd_export.passes.find_attention import AttentionBlock, find_attention
from qsvd_export.passes.contracts import GraphPass

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
    value, scale, masked = block.softmax.inputs[0], 1.0, False
    while value is not scores:
        node = value.producer()
        if node is None or len(node.inputs) != 2:
            return None
        a, b = node.inputs
        constant = const_array(b)
        if node.op_type in ("Mul", "Div") and constant is not None and constant.size == 1:
            factor = float(constant.reshape(()))
            scale *= factor if node.op_type == "Mul" else 1.0 / factor
            value = a  # type: ignore[assignment]
        elif node.op_type == "Add" and not masked and a is not None and b is not None:
            masked = True
            a_reads, b_reads = (x is scores or _reads(x, block.scores) for x in (a, b))
            if a_reads == b_reads:  # the mask must not depend on the scores
                return None
            value = a if a_reads else b
        else:
            return None
    return scale


def _reads(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``node`` is in the backward slice of ``value``."""
    return any(n is node for n in backward_nodes(value, set()))


def head_dims(value: ir.Value) -> tuple[int, int] | None:
    """(heads, head_dim) of a [B, heads, S, D] value with static heads and D."""
    shape = value.shape
    if shape is None or shape.rank() != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return None
    return int(shape[1]), int(shape[3])


def sequence_lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """``seqlens_k`` int32 [B] (valid tokens − 1 per row) and ``total_sequence_length`` int32 scalar from
    ``attention_mask``."""
    axis = initializer(graph, "qsvd/gqa/axis1", np.asarray([1], dtype=np.int64))
    valid = add_node(graph, "ReduceSum", [mask, axis], "qsvd/gqa/valid", {"keepdims": 0}).outputs[0]
    one = initializer(graph, "qsvd/gqa/one", np.asarray(1, dtype=np.int64))
    last = add_node(graph, "Sub", [valid, one], "qsvd/gqa/last").outputs[0]
    seqlens = add_node(graph, "Cast", [last], "qsvd/gqa/seqlens_k", {"to": ir.DataType.INT32}).outputs[0]
    width = add_node(graph, "Shape", [mask], "qsvd/gqa/width_1d", {"start": 1, "end": 2}).outputs[0]
    zero = initializer(graph, "qsvd/gqa/axis0", np.asarray([0], dtype=np.int64))
    scalar = add_node(graph, "Squeeze", [width, zero], "qsvd/gqa/width").outputs[0]
    total = add_node(graph, "Cast", [scalar], "qsvd/gqa/total_sequence_length", {"to": ir.DataType.INT32}).outputs[0]
    return seqlens, total


def flatten_heads(graph: ir.Graph, value: ir.Value, width: int, name: str) -> ir.Value:
    """[B, N, S, D] → [B, S, N·D]."""
    moved = add_node(graph, "Transpose", [value], f"{name}/bsnd", {"perm": [0, 2, 1, 3]}).outputs[0]
    shape = initializer(graph, f"{name}/shape", np.asarray([0, 0, width], dtype=np.int64))
    return add_node(graph, "Reshape", [moved, shape], f"{name}/flat").outputs[0]


def fuse_group_query_attention(model: ir.Model, latent: dict[int, LatentLayer] | None = None) -> FusionReport:
    """Rewrite the attention cores of ``model`` in place (module doc); returns what was fused or why not.

    ``latent``: per fusable block (in graph order), the absorbed latent attention that replaces its dense
    cache (:mod:`qsvd_export.latent_layout`): queries mapped into the key latent, new keys/values mapped
    down, the GQA node over ``groups`` latent heads of size ``rank`` (an int8 cache with per-channel scales
    when the layer has them), its output mapped up per head; the cache I/O keeps its names and takes the
    latent's shape and dtype."""
    graph = model.graph
    report = FusionReport()
    masks = [v for v in graph.inputs if v.name == "attention_mask"]
    found = find_attention(model)
    blocks = found.blocks
    report.skipped.update({f.softmax: f"no attention block matched: {f.reason}" for f in found.failures})
    if not masks:
        report.skipped.update({b.softmax.name: "no attention_mask graph input" for b in blocks})
        return report
    fusable = []
    for block in blocks:
        reason, scale = match_fusable(block)
        if reason:
            report.skipped[block.softmax.name] = reason
        else:
            fusable.append((block, scale))
    if fusable:
        lengths = sequence_lengths(graph, masks[0])
        for index, (block, scale) in enumerate(fusable):
            _fuse(graph, block, lengths, scale, index, (latent or {}).get(index))
    report.fused = len(fusable)
    if report.fused:
        common.RemoveUnusedNodesPass()(model)
        graph.sort()
        model.opset_imports.setdefault("com.microsoft", 1)
    return report


def match_fusable(block: AttentionBlock) -> tuple[str | None, float]:
    """(why ``block`` cannot be fused or None, the score scale when it can)."""
    k_cache, v_cache = block.k_cache, block.v_cache
    if k_cache is None or v_cache is None:
        return "no K/V cache Concat (latent cache or no cache)", 0.0
    q_dims, k_dims, v_dims = head_dims(block.scores.inputs[0]), head_dims(k_cache.new), head_dims(v_cache.new)  # type: ignore[arg-type]
    if q_dims is None or k_dims is None or v_dims is None or k_cache.axis != 2 or v_cache.axis != 2:
        return "Q/K/V are not [batch, heads, seq, head_dim] with static heads and head_dim", 0.0
    if not (q_dims[1] == k_dims[1] == v_dims[1]) or k_dims[0] != v_dims[0] or q_dims[0] % k_dims[0]:
        return f"head geometry Q {q_dims}, K {k_dims}, V {v_dims} is not grouped-query attention", 0.0
    if not _reaches_through_moves(block.scores.inputs[1], k_cache.present):  # type: ignore[arg-type]
        return "K reaches QKᵀ through more than data movement", 0.0
    if not _reaches_through_moves(block.pv.inputs[1], v_cache.present):  # type: ignore[arg-type]
        return "V reaches P·V through more than data movement", 0.0
    scale = _score_scale(block)
    if scale is None:
        return "between QKᵀ and Softmax there is more than a constant scale and one additive mask", 0.0
    return None, scale


def _fuse(graph: ir.Graph, block: AttentionBlock, lengths: tuple[ir.Value, ir.Value], scale: float,
          index: int, latent: LatentLayer | None = None) -> None:
    k_cache, v_cache = block.k_cache, block.v_cache
    assert k_cache is not None and v_cache is not None
    q = block.scores.inputs[0]
    assert q is not None
    heads, dim = head_dims(q)  # type: ignore[misc]
    kv_heads = head_dims(k_cache.new)[0]  # type: ignore[index]
    name = f"qsvd/gqa{index}"
    groups, width = (kv_heads, dim) if latent is None else (latent.groups, latent.rank)
    extra: list[ir.Value | None] = []
    attributes: dict[str, object] = {"num_heads": heads, "kv_num_heads": groups, "scale": scale}
    if latent is not None and latent.key_up is not None:
        q = _per_head(graph, q, _query_maps(latent, heads, kv_heads, dim), f"{name}/query_latent")
    query = flatten_heads(graph, q, heads * width, f"{name}/query")
    key = _down(graph, k_cache.new, latent and latent.key_down, kv_heads * dim, groups, f"{name}/key")
    value = _down(graph, v_cache.new, latent and latent.value_down, kv_heads * dim, groups, f"{name}/value")
    if latent is not None and latent.key_scale is not None:
        attributes.update(kv_cache_bit_width=latent.cache_bits, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
        extra = [None] * 5 + [initializer(graph, f"{name}/k_scale", latent.key_scale.reshape(-1).astype(np.float32)),
                              initializer(graph, f"{name}/v_scale", latent.value_scale.reshape(-1).astype(np.float32))]  # type: ignore[union-attr]
    stored = width  # cache elements per latent head and token: int4 codes are packed two per byte
    if latent is not None:
        cache_type = {None: k_cache.past.dtype, 8: ir.DataType.INT8, 4: ir.DataType.UINT8}[latent.cache_bits]
        stored = width // 2 if latent.cache_bits == 4 else width
        for past in (k_cache.past, v_cache.past):
            old = past.shape
            past.dtype = cache_type
            past.shape = ir.Shape([old[0], groups, old[2], stored]) if old is not None else None  # type: ignore[index]
    node = add_node(graph, "GroupQueryAttention", [query, key, value, k_cache.past, v_cache.past, *lengths, *extra],
                    name, attributes, num_outputs=3, domain="com.microsoft")
    output, present_key, present_value = node.outputs
    split = initializer(graph, f"{name}/heads", np.asarray([0, 0, heads, width], dtype=np.int64))
    grid = add_node(graph, "Reshape", [output, split], f"{name}/bshd").outputs[0]
    back = add_node(graph, "Transpose", [grid], f"{name}/bhsd", {"perm": [0, 2, 1, 3]}).outputs[0]
    if latent is not None and latent.value_up is not None:
        back = _per_head(graph, back, _output_maps(latent, heads, kv_heads, dim), f"{name}/value_up")
    back.dtype, back.shape = block.pv.outputs[0].dtype, block.pv.outputs[0].shape
    block.pv.outputs[0].replace_all_uses_with(back)
    for cache, fresh in ((k_cache, present_key), (v_cache, present_value)):
        old = cache.present
        fresh.dtype = cache.past.dtype
        fresh.shape = old.shape if latent is None or old.shape is None else ir.Shape([old.shape[0], groups, old.shape[2], stored])
        old.replace_all_uses_with(fresh, replace_graph_outputs=True)
        final = old.name
        old.name = f"{final}/unfused"
        fresh.name = final


def _per_head(graph: ir.Graph, value: ir.Value, maps: np.ndarray, name: str) -> ir.Value:
    """[B, N, S, a] · maps [N, a, b] → [B, N, S, b] (one matrix per head, a batched MatMul)."""
    weight = initializer(graph, f"{name}/weight", maps.astype(np.float32))
    return add_node(graph, "MatMul", [value, weight], name).outputs[0]


def _down(graph: ir.Graph, rows: ir.Value, down: np.ndarray | None, width: int, groups: int, name: str) -> ir.Value:
    """New cache rows [B, KVH, S, D] → [B, S, G·r]: flattened, and with ``down`` [G, r, m·D] each group's
    heads mapped to its latent."""
    flat = flatten_heads(graph, rows, width, name)
    if down is None:
        return flat
    split = initializer(graph, f"{name}/groups", np.asarray([0, 0, groups, width // groups], dtype=np.int64))
    grouped = add_node(graph, "Reshape", [flat, split], f"{name}/bsgw").outputs[0]
    moved = add_node(graph, "Transpose", [grouped], f"{name}/bgsw", {"perm": [0, 2, 1, 3]}).outputs[0]
    latent = _per_head(graph, moved, np.ascontiguousarray(down.transpose(0, 2, 1)), f"{name}/down")
    return flatten_heads(graph, latent, groups * down.shape[1], f"{name}/latent")


def _head_blocks(up: np.ndarray, heads: int, kv_heads: int, dim: int) -> list[np.ndarray]:
    """For each query head h, the rows [D, r] of ``up`` [G, m·D, r] that belong to its KV head."""
    groups = up.shape[0]
    per_group = kv_heads // groups
    blocks = []
    for h in range(heads):
        kv = h // (heads // kv_heads)
        g, j = divmod(kv, per_group)
        blocks.append(up[g, j * dim:(j + 1) * dim, :])
    return blocks


def _query_maps(latent: LatentLayer, heads: int, kv_heads: int, dim: int) -> np.ndarray:
    """[H, D, r]: q'_h = q_h · key_up rows of its KV head (scores against the key latent)."""
    return np.stack(_head_blocks(latent.key_up, heads, kv_heads, dim))  # type: ignore[arg-type]


def _output_maps(latent: LatentLayer, heads: int, kv_heads: int, dim: int) -> np.ndarray:
    """[H, r, D]: o_h = (Σ p c_v) · value_up rowsᵀ of its KV head."""
    return np.stack([b.T for b in _head_blocks(latent.value_up, heads, kv_heads, dim)])  # type: ignore[arg-type]


class FuseGroupQueryAttentionPass(GraphPass):
    """:func:`fuse_group_query_attention` as a pass (``self.report``). requires: ``latent`` names only attention
    blocks the graph has. ensures: one GroupQueryAttention node per fused block."""

    def __init__(self, latent: dict[int, LatentLayer] | None = None) -> None:
        super().__init__()
        self.latent = latent or {}
        self.report = FusionReport()

    def requires(self, model: ir.Model) -> None:
        blocks = len(find_attention(model).blocks)
        extra = sorted(i for i in self.latent if not 0 <= i < blocks)
        if extra:
            raise self.precondition(f"latent layouts for blocks {extra}, the graph has {blocks} attention blocks")

    def ensures(self, model: ir.Model) -> None:
        fused = sum(1 for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft")
        if fused < self.report.fused:
            raise self.postcondition(f"{self.report.fused} blocks fused, {fused} GroupQueryAttention nodes")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = fuse_group_query_attention(model, self.latent)
        return ir.passes.PassResult(model, bool(self.report.fused))
