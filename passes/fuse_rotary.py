"""``fuse_rotary``: the rotate-half rotary embedding an exporter writes as eight elementwise nodes →
``com.microsoft.RotaryEmbedding`` (ONNX Runtime's CPU kernel: one pass over the tensor).

Before: ``y = x · cos + Concat(−x[..., D/2:], x[..., :D/2], axis=−1) · sin`` with x [B, N, S, D] and cos/sin
[B, 1, S, D] computed from one integer positions tensor P [B, S] alone (HF's ``apply_rotary_pos_emb``; the key
rebuild of :mod:`latent_kv` applies it to every cached key at every decode step: 0.88 ms of elementwise work for
3 × 2,048 × 64 values on 2 cores, 0.20 ms fused).

After: ``y = RotaryEmbedding(x, P, cos_cache, sin_cache)`` (interleaved 0), the caches [max(P) + 1, D/2] computed in
the graph each call by the graph's own cos/sin subgraph applied to ``Range(0, max(P) + 1)`` (shared by every node
that reads the same cos/sin; for 2,048 positions and D = 64, 131 K Cos/Sin values per step instead of tables
of the model's context: no position limit, no stored tables). A match is fused only when its cos/sin, run on
``check_positions`` positions in ONNX Runtime, repeat their first half (HF's ``cat(freqs, freqs)``) and are a
per-position lookup (shuffled positions give the same rows, float32 exact).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.passes._graph import add_node, backward_nodes, clone_nodes, const_array, initializer, producer_op
from qsvd_export.passes.contracts import GraphPass
from qsvd_export.passes.rotary_tables import index_sources, subgraph_session


def _half_slice(value: ir.Value | None) -> tuple[ir.Value, int, int] | None:
    """(x, start, end) of ``Slice(x, [start], [end], [−1 or 3])`` with unit step, else None."""
    node = producer_op(value, "Slice")
    if node is None or len(node.inputs) < 4:
        return None
    starts, ends, axes = (const_array(v) for v in node.inputs[1:4])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    if any(a is None or np.size(a) != 1 for a in (starts, ends, axes, steps)) or int(np.ravel(steps)[0]) != 1 \
            or int(np.ravel(axes)[0]) not in (-1, 3) or node.inputs[0] is None:
        return None
    return node.inputs[0], int(np.ravel(starts)[0]), int(np.ravel(ends)[0])


def _rotate_half(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(x, D/2) when ``value`` = Concat(Neg(x[..., h:]), x[..., :h], axis=−1), else None."""
    concat = producer_op(value, "Concat")
    axis = concat.attributes.get("axis") if concat is not None else None
    if concat is None or axis is None or axis.as_int() not in (-1, 3) or len(concat.inputs) != 2:
        return None
    neg = producer_op(concat.inputs[0], "Neg")
    second, first = (_half_slice(neg.inputs[0]) if neg is not None else None), _half_slice(concat.inputs[1])
    if second is None or first is None or second[0] is not first[0] or first[1] != 0:
        return None
    half = first[2]
    return (first[0], half) if second[1] == half and half > 0 and second[2] >= 2 * half else None


def rotary_match(add: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, int] | None:
    """(x, cos, sin, D/2) when ``add`` = Add(Mul(x, cos), Mul(rotate_half(x), sin)) (either operand order)."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    muls = [producer_op(v, "Mul") for v in add.inputs]
    if any(m is None or len(m.inputs) != 2 for m in muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        for r in (0, 1):
            found = _rotate_half(rotated.inputs[r])  # type: ignore[union-attr]
            if found is None:
                continue
            x, half = found
            sin = rotated.inputs[1 - r]  # type: ignore[union-attr]
            for c in (0, 1):
                if plain.inputs[1 - c] is x:  # type: ignore[union-attr]
                    return x, plain.inputs[c], sin, half  # type: ignore[union-attr,return-value]
    return None


_SAME_SHAPE = ("Cast", "Max", "Min", "Sub", "Add", "CumSum", "Clip", "Identity")


def _is_tokens_by_position(value: ir.Value, depth: int = 16) -> bool:
    """``value`` is [B, S]: its shape says so, or it is made by shape-keeping ops (with scalar constants) from one."""
    if value.shape is not None:
        return value.shape.rank() == 2
    node = value.producer()
    if node is None or node.op_type not in _SAME_SHAPE or depth == 0:
        return False
    data = [v for v in node.inputs if v is not None and const_array(v) is None]
    constants_scalar = all(np.size(const_array(v)) == 1 for v in node.inputs if v is not None and v not in data)
    return constants_scalar and (node.op_type != "CumSum" or len(data) == 1) \
        and all(_is_tokens_by_position(v, depth - 1) for v in data[:1])


def _check(model: ir.Model, cos: ir.Value, sin: ir.Value, half: int, positions: int) -> ir.Value | str:
    """The positions tensor P [B, S] that cos and sin are per-position lookups of, or why they are not. P is the
    integer [B, S] tensor nearest to cos that cos and sin are computed from alone."""
    of_sin = index_sources(sin)
    sources = [v for v in index_sources(cos) if v in of_sin and _is_tokens_by_position(v)]
    if not sources:
        return "cos/sin do not come from one integer [batch, seq] tensor alone"
    source = sources[0]
    session = subgraph_session(model, source, [cos, sin])
    dtype = np.int32 if source.dtype == ir.DataType.INT32 else np.int64
    tables = []
    for value in session.run([cos.name, sin.name], {source.name: np.arange(positions, dtype=dtype)[None]}):
        if value.shape != (1, 1, positions, 2 * half):
            return f"cos/sin of positions [1, n] have shape {value.shape}, not [1, 1, n, {2 * half}]"
        table = value.reshape(positions, 2 * half)
        if not np.array_equal(table[:, :half], table[:, half:]):
            return "cos/sin do not repeat their first half"
        tables.append(table)
    shuffled = np.random.default_rng(0).integers(0, positions, size=(1, 64)).astype(dtype)
    for table, value in zip(tables, session.run([cos.name, sin.name], {source.name: shuffled})):
        if not np.array_equal(table[shuffled[0]], value.reshape(64, 2 * half)):
            return "cos/sin rows depend on more than their own position"
    return source


def _caches(graph: ir.Graph, source: ir.Value, cos: ir.Value, sin: ir.Value, half: int,
            prefix: str) -> tuple[ir.Value, ir.Value]:
    """cos_cache, sin_cache [max(P) + 1, half]: the cos/sin subgraph cloned onto ``Range(0, max(P) + 1)``."""
    dtype = np.int32 if source.dtype == ir.DataType.INT32 else np.int64
    largest = add_node(graph, "ReduceMax", [source], f"{prefix}/largest", {"keepdims": 0}).outputs[0]
    count = add_node(graph, "Add", [largest, initializer(graph, f"{prefix}/one", np.asarray(1, dtype))],
                     f"{prefix}/count").outputs[0]
    rows = add_node(graph, "Range", [initializer(graph, f"{prefix}/zero", np.asarray(0, dtype)), count,
                                     initializer(graph, f"{prefix}/step", np.asarray(1, dtype))], f"{prefix}/range")
    positions = add_node(graph, "Unsqueeze", [rows.outputs[0], initializer(graph, f"{prefix}/axis",
                                                                             np.asarray([0], np.int64))],
                         f"{prefix}/positions").outputs[0]
    for value in (largest, count, rows.outputs[0], positions):
        value.dtype = source.dtype
    wanted = {id(n) for v in (cos, sin) for n in backward_nodes(v, stop={id(source)})}
    mapping = clone_nodes([n for n in graph if id(n) in wanted], {id(source): positions}, graph, prefix)
    for value in mapping.values():
        if value.dtype is None:  # an untyped original stays untyped (not a tensor of no element type)
            value.type = None
    caches = []
    for name, value in (("cos", cos), ("sin", sin)):
        shape = initializer(graph, f"{prefix}/{name}_rows", np.asarray([-1, 2 * half], np.int64))
        flat = add_node(graph, "Reshape", [mapping[id(value)], shape], f"{prefix}/{name}_flat").outputs[0]
        starts, ends, axes = (initializer(graph, f"{prefix}/{name}_{k}", np.asarray([v], np.int64))
                              for k, v in (("start", 0), ("end", half), ("axis", 1)))
        cache = add_node(graph, "Slice", [flat, starts, ends, axes], f"{prefix}/{name}_cache").outputs[0]
        cache.dtype = flat.dtype = ir.DataType.FLOAT
        caches.append(cache)
    return caches[0], caches[1]


class FuseRotaryEmbeddingPass(GraphPass):
    """``check_positions``: how many positions the cos/sin lookup check runs on (not a limit of the fused graph).
    ``self.fused`` counts rewrites, ``self.skipped`` gives each match left unfused with its reason. requires:
    ``check_positions`` ≥ 1 and a closed graph (its cos/sin cones are run). ensures: every match is fused or has
    its reason in ``skipped``."""

    def __init__(self, check_positions: int = 4096) -> None:
        super().__init__()
        self.check_positions = check_positions
        self.fused = 0
        self.skipped: list[str] = []

    def requires(self, model: ir.Model) -> None:
        if self.check_positions < 1:
            raise self.precondition(f"check_positions must be ≥ 1, got {self.check_positions}")
        self.require_closed_graph(model)

    def ensures(self, model: ir.Model) -> None:
        left = [n for n in model.graph if rotary_match(n) is not None]
        if len(left) != len(self.skipped):
            raise self.postcondition(f"{len(left)} rotary embeddings left, {len(self.skipped)} with a reason")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        caches: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value] | str] = {}
        for add, (x, cos, sin, half) in [(n, m) for n in graph if (m := rotary_match(n)) is not None]:
            key = (id(cos), id(sin))
            if key not in caches:
                found = _check(model, cos, sin, half, self.check_positions)
                caches[key] = found if isinstance(found, str) else (
                    found, *_caches(graph, found, cos, sin, half, f"qsvd/rotary/{len(caches)}"))
            cached = caches[key]
            if isinstance(cached, str):
                self.skipped.append(f"{add.name}: {cached}")
                continue
            positions, cos_cache, sin_cache = cached
            fused = ir.Node("com.microsoft", "RotaryEmbedding", [x, positions, cos_cache, sin_cache],
                            attributes=[ir.AttrInt64("interleaved", 0)], name=f"{add.name or 'rope'}/fused")
            fused.outputs[0].dtype, fused.outputs[0].shape = add.outputs[0].dtype, add.outputs[0].shape
            graph.insert_before(add, fused)
            add.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
            self.fused += 1
        if self.fused:
            if "com.microsoft" not in model.opset_imports:
                model.opset_imports["com.microsoft"] = 1
            common.RemoveUnusedNodesPass()(model)
            graph.sort()
        return ir.passes.PassResult(model, bool(self.fused))
