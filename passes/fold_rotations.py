"""fold_rotations: give an unrotated dense graph the residual rotation a ``compress --rotate`` plan was built on.

A plan computed on residual-rotated weights (``plan.method["residual_rotation"]``: H1 = Q, seeded) only
fits a graph whose residual stream lives in the same basis. Our own ``export --rotate`` writes such a
graph; a foreign graph of the same model does not. This pass rotates it in place, the graph-stage twin
of :func:`qsvd_export.compress.residual_rotation.rotate_residual_stream` (MatMul layout, W [in, out]):

- the embedding table T [V, E] (a ``Gather`` on the token ids) → T·Q;
- each RMSNorm reading the stream (decomposed ``x · rsqrt(mean(x²) + ε) · γ``, or
  ``SimplifiedLayerNormalization``): γ folded into the MatMuls reading its output, γ → 1, then those
  weights W → Qᵀ·diag(γ)·W; a tied head ``MatMul(h, Transpose(T))`` is untied first (the final γ folds
  into the head only);
- each residual writer ``MatMul(x, W [in, E])`` (+ bias b) feeding a residual ``Add`` → W·Q (b·Q).

With the plan's online down_proj rotation (``--rotate-mlp``), each MLP down_proj (a residual writer
reading a ``Mul``: the GLU product) also gets its input rotated online by Q_m = A ⊗ B, as the torch
model's ``OnlineRotation``: ``Reshape [0, 0, a, b] → MatMul(·, B) → MatMul(Aᵀ, ·) → Reshape [0, 0, n]``
before it, and its weight W → Q_mᵀ·W. With the online o_proj rotation (``--rotate-o-proj``) each
attention o_proj (a residual writer not reading a ``Mul``) gets the same treatment with
Q_o = A_h ⊗ B_d (``head_factors``: heads × head_dim).

Anything else reading the residual stream (a LayerNorm's mean, a stream value that is a graph output, a
Cast) makes the pass refuse with the node named: rotating it would change the graph's function.
Outputs are unchanged up to float32 rounding; the plan's weight probes, checked by split_qkv afterwards,
confirm the basis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qsvd_export.passes.context import GraphStageContext
from qsvd_export.passes.contracts import GraphPass, PassContractError
from qsvd_export.passes.find_attention import find_attention
from qsvd_export.plan.schema import probes_mismatch, weight_probes

class FoldError(PassContractError):
    """The graph's residual stream cannot be rotated as the plan says (the message names the node)."""

    def __init__(self, reason: str, node: ir.Node | None = None) -> None:
        super().__init__("FoldRotationsPass", reason, node)


@dataclass
class _Folds:
    """What to rewrite, collected before any weight changes."""

    table: ir.Value | None = None
    readers: list[tuple[ir.Node, ir.Value | None]] = field(default_factory=list)  # (MatMul, γ value or None)
    gains: list[ir.Value] = field(default_factory=list)
    writers: list[tuple[ir.Node, ir.Value | None]] = field(default_factory=list)  # (MatMul, bias value or None)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    others = [i for i in node.inputs if i is not value]
    return others[0] if len(others) == 1 else None


def _is_stats(node: ir.Node, stream: ir.Value) -> bool:
    """``Pow(x, 2)`` or ``Mul(x, x)`` read only by a ReduceMean: mean(x²), invariant under an orthogonal Q
    (the reduction is over the last axis, the residual width)."""
    if node.op_type == "Pow":
        exponent = _const(node.inputs[1])
        if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
            return False
    elif not (node.op_type == "Mul" and node.inputs[0] is stream and node.inputs[1] is stream):
        return False
    readers = node.outputs[0].consumers()
    return bool(readers) and all(r.op_type == "ReduceMean" for r in readers)


def _gain_after(normalized: ir.Value, width: int) -> tuple[ir.Value, ir.Value]:
    """(γ, normed output) of the ``Mul(γ, x·rsqrt)`` after the normalizing Mul."""
    consumers = normalized.consumers()
    if len(consumers) != 1 or consumers[0].op_type != "Mul":
        raise FoldError(f"RMSNorm output {normalized.name} is not scaled by one gain Mul")
    gain = _other(consumers[0], normalized)
    array = _const(gain)
    if gain is None or array is None or array.shape != (width,):
        raise FoldError(f"RMSNorm gain of node {consumers[0].name} is not a constant [{width}] vector")
    return gain, consumers[0].outputs[0]


def _readers(normed: ir.Value, gain: ir.Value | None, width: int, folds: _Folds) -> None:
    for node in normed.consumers():
        if node.op_type != "MatMul" or node.inputs[0] is not normed:
            raise FoldError(f"{node.op_type} node {node.name} reads a normalized residual stream (expected MatMul)")
        weight = node.inputs[1]
        tied = weight.producer() if weight is not None else None
        if _const(weight) is None and not (tied is not None and tied.op_type == "Transpose"
                                           and _const(tied.inputs[0]) is not None):
            raise FoldError(f"MatMul node {node.name} reads the stream with a non-constant weight")
        folds.readers.append((node, gain))


def _writer(branch: ir.Value, width: int, folds: _Folds) -> None:
    """The residual branch's last MatMul (and its bias Add) writing [.., E] into the stream."""
    node = branch.producer()
    bias = None
    if node is not None and node.op_type == "Add":
        for index, value in enumerate(node.inputs):
            array = _const(value)
            if array is not None and array.shape == (width,):
                bias, node = value, node.inputs[1 - index].producer()
                break
    if node is None or node.op_type != "MatMul" or _const(node.inputs[1]) is None:
        raise FoldError(f"residual branch {branch.name} does not end in a MatMul with a constant weight")
    folds.writers.append((node, bias))


def collect_folds(graph: ir.Graph) -> _Folds:
    """Walk the residual stream from the embedding lookup and classify everything reading it."""
    tables = [n for n in graph if n.op_type == "Gather" and _const(n.inputs[0]) is not None
              and n.inputs[0].const_value.shape.rank() == 2 and n.inputs[1] is not None and n.inputs[1].is_graph_input()]
    if len(tables) != 1:
        raise FoldError(f"expected one embedding Gather on a graph input, found {len(tables)}")
    folds = _Folds(table=tables[0].inputs[0])
    width = int(folds.table.const_value.shape[1])  # type: ignore[union-attr]
    frontier, seen = [tables[0].outputs[0]], set()
    while frontier:
        stream = frontier.pop()
        if id(stream) in seen:
            continue
        seen.add(id(stream))
        if stream.is_graph_output():
            raise FoldError(f"residual stream value {stream.name} is a graph output")
        for node in stream.consumers():
            other = _other(node, stream)
            if node.op_type == "Add" and other is not None and _const(other) is None:
                _writer(other, width, folds)
                frontier.append(node.outputs[0])
            elif _is_stats(node, stream):
                continue
            elif node.op_type == "Mul" and other is not None and _const(other) is None:
                gain, normed = _gain_after(node.outputs[0], width)
                folds.gains.append(gain)
                _readers(normed, gain, width, folds)
            elif node.op_type == "SimplifiedLayerNormalization":
                gain = node.inputs[1]
                if _const(gain) is None:
                    raise FoldError(f"SimplifiedLayerNormalization node {node.name} has no constant gain")
                folds.gains.append(gain)  # type: ignore[arg-type]
                _readers(node.outputs[0], gain, width, folds)
            else:
                raise FoldError(f"{node.op_type} node {node.name} reads the residual stream (not an RMSNorm, a "
                                "residual Add or a norm statistic)")
    if not folds.writers or not folds.readers:
        raise FoldError("no residual writers or readers found")
    return folds


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array.astype(np.float32)), name=value.name)


def _mlp_writers(folds: _Folds) -> list[ir.Node]:
    """The residual writers that are MLP down_projs: their input is the GLU product (a ``Mul``)."""
    writers = []
    for node, _ in folds.writers:
        source = node.inputs[0].producer() if node.inputs[0] is not None else None
        if source is not None and source.op_type == "Mul":
            writers.append(node)
    return writers


def insert_online_rotations(graph: ir.Graph, writers: list[ir.Node],
                            factors: Callable[[int], tuple[np.ndarray, np.ndarray]], name: str) -> None:
    """Rotate each writer's input online by A ⊗ B (``factors(n)`` for its input width n) and its weight by
    the transpose, so the MatMul's output is unchanged. Inputs must be [batch, seq, n]."""
    from qsvd_export.passes._graph import add_node, initializer

    for index, node in enumerate(writers):
        x, weight = node.inputs[0], node.inputs[1]
        if x is None or x.shape is None or x.shape.rank() != 3:
            raise FoldError(f"{name} node {node.name} input is not [batch, seq, n]: cannot rotate it online")
        n = int(_const(weight).shape[0])  # type: ignore[union-attr]
        a, b = factors(n)
        prefix = f"qsvd/online_rotation_{name}{index}"
        grid = initializer(graph, f"{prefix}/grid", np.asarray([0, 0, a.shape[0], b.shape[0]], dtype=np.int64))
        flat = initializer(graph, f"{prefix}/flat", np.asarray([0, 0, n], dtype=np.int64))
        right = initializer(graph, f"{prefix}/b", np.ascontiguousarray(b.astype(np.float32)))
        left = initializer(graph, f"{prefix}/a_t", np.ascontiguousarray(a.T.astype(np.float32)))
        value = add_node(graph, "Reshape", [x, grid], f"{prefix}/grid_view").outputs[0]
        value = add_node(graph, "MatMul", [value, right], f"{prefix}/times_b").outputs[0]
        value = add_node(graph, "MatMul", [left, value], f"{prefix}/a_t_times").outputs[0]
        value = add_node(graph, "Reshape", [value, flat], f"{prefix}/flat_view").outputs[0]
        value.dtype, value.shape = x.dtype, x.shape
        node.replace_input_with(0, value)
        rotated = np.kron(a, b).T @ _const(weight).astype(np.float64)  # type: ignore[union-attr]
        if len(weight.uses()) == 1:  # type: ignore[union-attr]
            _set(weight, rotated)  # type: ignore[arg-type]
        else:
            node.replace_input_with(1, initializer(graph, f"{prefix}/weight", rotated.astype(np.float32)))


def apply_folds(graph: ir.Graph, folds: _Folds, q: np.ndarray) -> None:
    """Rewrite the collected weights for the residual rotation ``q`` [E, E] (float64 math)."""
    table = folds.table
    assert table is not None
    original_table = _const(table).astype(np.float64)  # type: ignore[union-attr]
    for node, gain in folds.readers:
        weight = node.inputs[1]
        assert weight is not None
        producer = weight.producer()
        if producer is not None and producer.op_type == "Transpose":  # tied head: untie from the table
            source = producer.inputs[0]
            array = (original_table if source is table else _const(source).astype(np.float64)).T  # type: ignore[union-attr]
            name = f"{source.name}.untied_head"  # type: ignore[union-attr]
        else:
            array = _const(weight).astype(np.float64)  # type: ignore[union-attr]
            name = weight.name if len(weight.uses()) == 1 else f"{weight.name}.rotated.{node.name}"
        if gain is not None:
            array = _const(gain).astype(np.float64)[:, None] * array  # type: ignore[union-attr]
        rotated = q.T @ array
        if name == weight.name:
            _set(weight, rotated)
        else:  # a weight of its own: untied from the table, or shared with a reader outside the stream
            fresh = ir.Value(name=name)
            _set(fresh, rotated)
            graph.register_initializer(fresh)
            node.replace_input_with(1, fresh)
    for gain in folds.gains:
        _set(gain, np.ones_like(_const(gain), dtype=np.float64))  # type: ignore[arg-type]
    for node, bias in folds.writers:
        weight = node.inputs[1]
        _set(weight, _const(weight).astype(np.float64) @ q)  # type: ignore[arg-type, union-attr]
        if bias is not None:
            _set(bias, _const(bias).astype(np.float64) @ q)  # type: ignore[union-attr]
    _set(table, original_table @ q)


def graph_matches_plan(model: ir.Model, plan) -> bool:  # type: ignore[no-untyped-def]
    """Whether the first attention block's Q/K/V weights are the ones the plan was computed from."""
    blocks = find_attention(model).blocks
    layer = plan.layers[0] if plan.layers else None
    if not blocks or layer is None or layer.probes is None:
        return True  # nothing to compare: split_qkv reports any mismatch
    block = blocks[0]
    return all(probes_mismatch(layer.probes[m], weight_probes(p.weight.T)) is None
               for m, p in (("q", block.q), ("k", block.k), ("v", block.v)))


class FoldRotationsPass(GraphPass):
    """Rotate the residual stream of an unrotated graph to the basis of a rotated plan (see module doc).

    requires: a plan that records a residual rotation. ensures: the first block's Q/K/V weights are the ones
    the plan was computed from (its probes match)."""

    def __init__(self, context: GraphStageContext) -> None:
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        plan = self.context.plan
        if plan is None or not plan.method.get("residual_rotation"):
            raise self.precondition("the plan records no residual rotation (compress --rotate)")

    def ensures(self, model: ir.Model) -> None:
        if not graph_matches_plan(model, self.context.plan):
            raise self.postcondition("after folding, the first block's weights still differ from the plan's")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qsvd_export.compress.residual_rotation import (O_PROJ_SEED_OFFSET, head_factors, kronecker_factors,
                                                            residual_rotation_matrix)

        plan = self.context.plan
        spec = plan.method.get("residual_rotation") if plan is not None else None
        if not spec or graph_matches_plan(model, plan):
            return ir.passes.PassResult(model, False)
        folds = collect_folds(model.graph)
        width = int(folds.table.const_value.shape[1])  # type: ignore[union-attr]
        if width != int(spec["width"]):
            raise FoldError(f"the plan's rotation is {spec['width']} wide, the graph's residual stream {width}")
        online = _mlp_writers(folds) if spec.get("online_mlp_rotation") else []
        if spec.get("online_mlp_rotation") and len(online) != len(folds.writers) // 2:
            raise FoldError(f"found {len(online)} MLP down_projs among {len(folds.writers)} residual writers: "
                            "cannot place the online down_proj rotation")
        mlp = set(online)
        attention = [node for node, _ in folds.writers if node not in mlp] if spec.get("online_o_proj_rotation") else []
        if attention and len(attention) != len(folds.writers) // 2:
            raise FoldError(f"found {len(attention)} attention o_projs among {len(folds.writers)} residual writers: "
                            "cannot place the online o_proj rotation")
        seed = int(spec["seed"])
        apply_folds(model.graph, folds, residual_rotation_matrix(width, seed).numpy())
        insert_online_rotations(model.graph, online, lambda n: tuple(m.numpy() for m in kronecker_factors(n, seed + 1)),
                                "down_proj")
        if attention:
            heads, head_dim = int(spec["heads"]), int(spec["head_dim"])
            factors = tuple(m.numpy() for m in head_factors(heads, head_dim, seed + O_PROJ_SEED_OFFSET))

            def o_proj_factors(n: int) -> tuple[np.ndarray, np.ndarray]:
                if n != heads * head_dim:
                    raise FoldError(f"an o_proj reads {n} values, the plan's rotation {heads} heads x {head_dim}")
                return factors  # type: ignore[return-value]

            insert_online_rotations(model.graph, attention, o_proj_factors, "o_proj")
        self.context.folded_rotation = {**spec, "folded_in_graph_stage": True, "readers": len(folds.readers),
                                        "writers": len(folds.writers), "norms": len(folds.gains),
                                        "online_rotations": len(online) + len(attention)}
        return ir.passes.PassResult(model, True)
