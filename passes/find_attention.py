"""Attention discovery by graph pattern (no node or tensor names are used).

Anchor: each ``Softmax`` whose output feeds a MatMul (P·V) and whose input comes from a MatMul (Q·Kᵀ),
possibly through scale (Mul/Div), mask (Add/Where) and Cast nodes. From the two MatMuls the Q, K and V
branches are followed backwards through data-movement, RoPE and normalization ops to the projections:
``MatMul(X, W)`` / ``MatMul(X, Transpose(W))`` / ``Gemm`` with a constant 2-D weight, an optional bias
``Add`` of a constant vector, or one fused QKV projection split by ``Split``/``Slice`` along the last axis.
On the K and V branches a ``Concat(past_input, new)`` whose output is a graph output is the KV cache.

A Softmax that does not lead to such a block is reported with the reason (``MatchFailure``) and the
graph is left untouched there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import const_array, matmul_weight, path_nodes, topo_order
from qsvd_export.passes.contracts import Decline

# Attention kernels of ONNX (opset 23) and onnxruntime's contrib domain: nothing inside them to match.
FUSED_ATTENTION = frozenset({"Attention", "GroupQueryAttention", "MultiHeadAttention", "PackedAttention",
                             "PackedMultiHeadAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention"})

# Which inputs carry data (as opposed to shapes, axes, indices) for ops we walk through.
_DATA_INPUTS = {
    "Reshape": (0,), "Expand": (0,), "Slice": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Transpose": (0,),
    "Cast": (0,), "Split": (0,), "Identity": (0,), "Tile": (0,), "ReduceMean": (0,), "Gather": (0,),
    "Flatten": (0,), "CastLike": (0,), "RotaryEmbedding": (0,),  # opset 23: cos/sin inputs are tables
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Concat", "Where", "Tanh",
                "Sigmoid", "Erf", "Max", "Min", "Abs", "Exp", "Cos", "Sin"}
# Projections whose weights are already quantized: refused by name (their float weights are not in the graph).
_QUANTIZED_PROJECTIONS = frozenset({"MatMulNBits", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
                                    "DynamicQuantizeMatMul", "QAttention", "DequantizeLinear", "GatherBlockQuantized"})
_SCORE_PATH = {"Add", "Mul", "Div", "Cast", "Where", "Tanh", "Sub", "Identity"}


@dataclass
class Projection:
    """X·W (+ b) for one member; ``weight`` is [E, out] (MatMul layout) and ``columns`` its slice if fused."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    output: ir.Value  # the graph value equal to X·W_m + b_m for this member ([.., out_m])
    columns: tuple[int, int]


@dataclass
class CacheConcat:
    node: ir.Node
    past: ir.Value  # graph input
    present: ir.Value  # graph output
    new: ir.Value  # the non-cache Concat input
    axis: int


@dataclass
class AttentionBlock:
    index: int
    x: ir.Value  # shared projection input [batch, seq, E]
    q: Projection
    k: Projection
    v: Projection
    scores: ir.Node  # Q·Kᵀ MatMul
    softmax: ir.Node
    pv: ir.Node  # P·V MatMul
    k_cache: CacheConcat | None = None
    v_cache: CacheConcat | None = None
    fused: bool = False

    @property
    def dims(self) -> dict[str, int]:
        return {"e": int(self.q.weight.shape[0]), "q": int(self.q.weight.shape[1]),
                "k": int(self.k.weight.shape[1]), "v": int(self.v.weight.shape[1])}


@dataclass
class MatchFailure:
    softmax: str
    reason: str


@dataclass
class AttentionMatches:
    blocks: list[AttentionBlock] = field(default_factory=list)
    failures: list[MatchFailure] = field(default_factory=list)


def _projection_weight(node: ir.Node) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(input X, weight [E, out], bias or None) if ``node`` is a projection with constant weights."""
    weight = matmul_weight(node)
    if weight is not None and node.inputs[0] is not None:
        return node.inputs[0], np.asarray(weight, dtype=np.float32), None
    if node.op_type == "Gemm":
        a, b = node.inputs[0], node.inputs[1]
        weight = const_array(b)
        if weight is None or a is None:
            return None
        attrs = {k: v.value for k, v in node.attributes.items()}
        if attrs.get("transA", 0):
            return None
        weight = weight.T if attrs.get("transB", 0) else weight
        weight = weight * float(attrs.get("alpha", 1.0))
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is not None:
            bias = bias * float(attrs.get("beta", 1.0))
            if bias.ndim != 1:
                return None
        return a, np.asarray(weight, dtype=np.float32), bias
    return None


def _data_walk(start: ir.Value, limit: int = 400) -> tuple[list[ir.Node], list[ir.Value]]:
    """Walk backwards from ``start`` through data inputs only (never a Shape's, an index's or an axis's
    input), stopping at projections: (projection nodes reached, values visited in walk order)."""
    found: dict[int, ir.Node] = {}
    seen: dict[int, ir.Value] = {}
    stack = [start]
    while stack:
        value = stack.pop()
        if id(value) in seen or value.is_graph_input() or value.const_value is not None:
            continue
        seen[id(value)] = value
        if len(seen) > limit:
            raise Decline("branch too long to follow")
        node = value.producer()
        if node is None:
            continue
        if _projection_weight(node) is not None:
            found[id(node)] = node
            continue
        if node.op_type in _QUANTIZED_PROJECTIONS:
            raise Decline(f"the Q/K/V projections are already quantized ({node.domain or 'ai.onnx'}::{node.op_type}); "
                           "the graph stage factors float weights: give the fp32 export (e.g. onnxruntime-genai's "
                           "builder with -p fp32)")
        if node.op_type in _DATA_INPUTS:
            indices = _DATA_INPUTS[node.op_type]
        elif node.op_type in _ELEMENTWISE or node.op_type == "MatMul":
            indices = tuple(range(len(node.inputs)))
        elif node.op_type in ("Shape", "Size", "Constant", "ConstantOfShape", "Range"):
            continue
        else:
            raise Decline(f"unsupported op {node.op_type} on a Q/K/V branch")
        stack.extend(node.inputs[i] for i in indices if i < len(node.inputs) and node.inputs[i] is not None)
    return list(found.values()), list(seen.values())


def _find_projections(start: ir.Value) -> list[ir.Node]:
    """Projection nodes reached walking backwards from ``start`` through data inputs only."""
    return _data_walk(start)[0]


def _single_projection(start: ir.Value, branch: str) -> ir.Node:
    found = _find_projections(start)
    if len(found) != 1:
        raise Decline(f"{branch} branch reaches {len(found)} projections (expected 1)")
    return found[0]


def _bias_after(value: ir.Value) -> tuple[ir.Value, np.ndarray | None, ir.Node | None]:
    """Follow an Add of a constant vector after a projection output, if it is the only consumer."""
    consumers = value.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
        bias = const_array(other)
        if bias is not None and bias.ndim == 1:
            return add.outputs[0], bias, add
    return value, None, None


def _shared_input(x: ir.Value) -> ir.Value:
    """The [batch, seq, E] value behind a 2-D projection input produced by a flattening Reshape."""
    producer = x.producer()
    if producer is not None and producer.op_type == "Reshape" and x.shape is not None and x.shape.rank() == 2:
        source = producer.inputs[0]
        if source is not None and source.shape is not None and source.shape.rank() == 3:
            return source
    return x


def _separate_projection(node: ir.Node) -> Projection:
    x, weight, bias = _projection_weight(node)  # type: ignore[misc]
    output = node.outputs[0]
    if bias is None:
        output, bias, _ = _bias_after(output)
    return Projection(node, weight, bias, output, (0, weight.shape[1]))


def _fused_projections(node: ir.Node, starts: dict[str, ir.Value]) -> dict[str, Projection]:
    """Split one fused [E, q+k+v] projection into members by the Split/Slice each branch passes through."""
    _, weight, bias = _projection_weight(node)  # type: ignore[misc]
    out = node.outputs[0]
    if bias is None:
        out, bias, _ = _bias_after(out)
    members: dict[str, Projection] = {}
    for member, start in starts.items():
        # the data path only: a Reshape of V may take its shape from Shape(K), another split output
        branch = _data_walk(start)[1]
        splitters = list({id(v.producer()): v.producer() for v in branch
                          if v.producer() is not None and v.producer().op_type in ("Split", "Slice")}.values())
        if len(splitters) > 1:  # the packed output's split comes first; later slices (rotate-half RoPE) are per member
            splitters = [s for s in splitters if s.inputs and s.inputs[0] is not None and not any(
                id(n) in {id(o) for o in splitters if o is not s}
                for n in (path_nodes(node.outputs[0], s.inputs[0]) or []))]
        if len(splitters) != 1:
            raise Decline(f"fused QKV: {member} branch passes {len(splitters)} Split/Slice nodes (expected 1)")
        splitter = splitters[0]
        on_branch = {id(v) for v in branch}
        source = splitter.inputs[0]
        if source is None or source.shape is None:
            raise Decline("fused QKV: unknown split input shape")
        width = weight.shape[1]
        if splitter.op_type == "Split":
            axis = splitter.attributes.get("axis", ir.AttrInt64("axis", 0)).value
            if axis not in (-1, source.shape.rank() - 1):
                raise Decline("fused QKV split is not along the last axis")
            sizes = const_array(splitter.inputs[1]) if len(splitter.inputs) > 1 else None
            parts = len(splitter.outputs)
            sizes = [width // parts] * parts if sizes is None else [int(s) for s in sizes]
            index = next(i for i, o in enumerate(splitter.outputs) if id(o) in on_branch)
            begin = sum(sizes[:index])
            columns = (begin, begin + sizes[index])
            member_value = splitter.outputs[index]
        else:
            starts_, ends = const_array(splitter.inputs[1]), const_array(splitter.inputs[2])
            axes = const_array(splitter.inputs[3]) if len(splitter.inputs) > 3 else None
            if starts_ is None or ends is None or len(starts_) != 1 or (axes is not None and int(axes[0]) not in (-1, source.shape.rank() - 1)):
                raise Decline("fused QKV slice is not a constant last-axis slice")
            columns = (int(starts_[0]), min(int(ends[0]), width))
            member_value = splitter.outputs[0]
        if member_value.shape is None or member_value.shape.rank() != 3:
            raise Decline("fused QKV member is not [batch, seq, width]")
        members[member] = Projection(
            node, weight[:, columns[0]:columns[1]], None if bias is None else bias[columns[0]:columns[1]],
            member_value, columns,
        )
    return members


def _cache_concat(start: ir.Value, proj_output: ir.Value) -> CacheConcat | None:
    nodes = path_nodes(proj_output, start) or []
    for node in nodes:
        if node.op_type != "Concat" or len(node.inputs) != 2:
            continue
        past, new = node.inputs
        if past is None or not past.is_graph_input():
            past, new = new, past
        if past is None or not past.is_graph_input() or not node.outputs[0].is_graph_output():
            continue
        rank = past.shape.rank() if past.shape is not None else 4
        axis = int(node.attributes.get("axis", ir.AttrInt64("axis", 0)).value)
        return CacheConcat(node, past, node.outputs[0], new, axis % rank)  # type: ignore[arg-type]
    return None


def _scores_matmul(softmax: ir.Node) -> ir.Node:
    value = softmax.inputs[0]
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            break
        if node.op_type == "MatMul":
            return node
        if node.op_type not in _SCORE_PATH:
            break
        candidates = [i for i in node.inputs if i is not None and const_array(i) is None and not i.is_graph_input()]
        # The scores come from a MatMul; the mask side does not (it is built from inputs / Where).
        value = next((i for i in candidates if _leads_to_matmul(i)), None)
    raise Decline("Softmax input does not come from a Q·Kᵀ MatMul")


def _leads_to_matmul(value: ir.Value) -> bool:
    for _ in range(8):
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "MatMul":
            return True
        if node.op_type not in _SCORE_PATH:
            return False
        nxt = [i for i in node.inputs if i is not None and const_array(i) is None and not i.is_graph_input()]
        if not nxt:
            return False
        value = nxt[0]
    return False


def _is_nan_guard(node: ir.Node, value: ir.Value) -> bool:
    """``Where(IsNaN(value), c, value)`` with a constant ``c``: the NaN guard the TorchScript and dynamo
    exporters put after an sdpa Softmax (fully masked rows give NaN; the guard makes them 0)."""
    if node.op_type != "Where" or len(node.inputs) != 3 or node.inputs[2] is not value:
        return False
    condition = node.inputs[0].producer() if node.inputs[0] is not None else None
    return (condition is not None and condition.op_type == "IsNaN" and condition.inputs[0] is value
            and const_array(node.inputs[1]) is not None)


def _pv_matmul(softmax: ir.Node) -> ir.Node:
    """The P·V MatMul after ``softmax``, through Cast / Identity / Dropout and the sdpa NaN guard."""
    value = softmax.outputs[0]
    for _ in range(6):
        consumers = value.consumers()
        matmuls = [c for c in consumers if c.op_type == "MatMul" and c.inputs[0] is value]
        if matmuls:
            return matmuls[0]
        passthrough = [c for c in consumers if c.op_type in ("Cast", "Identity", "Dropout") or _is_nan_guard(c, value)]
        if not passthrough:
            break
        value = passthrough[0].outputs[0]
    raise Decline("Softmax output does not feed a P·V MatMul")


def _match_block(softmax: ir.Node) -> AttentionBlock:
    scores = _scores_matmul(softmax)
    pv = _pv_matmul(softmax)
    starts = {"q": scores.inputs[0], "k": scores.inputs[1], "v": pv.inputs[1]}
    if any(v is None for v in starts.values()):
        raise Decline("attention MatMul with a missing input")
    nodes = {m: _single_projection(v, m.upper()) for m, v in starts.items()}  # type: ignore[arg-type]
    distinct = {id(n) for n in nodes.values()}
    if len(distinct) == 1:
        projections = _fused_projections(nodes["q"], starts)  # type: ignore[arg-type]
        x = _projection_weight(nodes["q"])[0]  # type: ignore[index]
        fused = True
    elif len(distinct) == 3:
        projections = {m: _separate_projection(n) for m, n in nodes.items()}
        inputs = {id(_projection_weight(n)[0]) for n in nodes.values()}  # type: ignore[index]
        if len(inputs) != 1:
            raise Decline("Q, K and V projections do not share one input")
        x = _projection_weight(nodes["q"])[0]  # type: ignore[index]
        fused = False
    else:
        raise Decline("two of Q, K, V share a projection and the third does not")
    widths = {p.weight.shape[0] for p in projections.values()}
    if len(widths) != 1:
        raise Decline("Q, K, V projections have different input widths")
    block = AttentionBlock(
        index=-1, x=_shared_input(x), q=projections["q"], k=projections["k"], v=projections["v"],
        scores=scores, softmax=softmax, pv=pv, fused=fused,
    )
    block.k_cache = _cache_concat(starts["k"], projections["k"].output)  # type: ignore[arg-type]
    block.v_cache = _cache_concat(starts["v"], projections["v"].output)  # type: ignore[arg-type]
    return block


def find_attention(model: ir.Model) -> AttentionMatches:
    """All self-attention blocks of the main graph in topological order, plus the reasons for non-matches."""
    graph = model.graph
    matches = AttentionMatches()
    for softmax in topo_order([n for n in graph if n.op_type == "Softmax"], graph):
        try:
            block = _match_block(softmax)
        except Decline as reason:
            matches.failures.append(MatchFailure(softmax.name or "Softmax", str(reason)))
            continue
        block.index = len(matches.blocks)
        matches.blocks.append(block)
    for node in graph:  # fused attention kernels hide Q·Kᵀ, the softmax and P·V inside one op
        if node.op_type in FUSED_ATTENTION:
            matches.failures.append(MatchFailure(
                node.name or node.op_type,
                f"attention is one fused {node.domain or 'ai.onnx'}::{node.op_type} op (onnxruntime-genai / optimized "
                "export); the graph stage needs Q·Kᵀ → Softmax → P·V as separate ops: export the model unfused"))
    return matches
