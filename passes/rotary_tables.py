"""``rotary_tables``: rotary cos/sin computed from positions → Gather from precomputed tables.

A decoder computes its rotary embedding as ``cos(position · inv_freq)`` / ``sin(...)``. Quantized, the
angle tensor spans ``[0, context · max inv_freq]``: at 16 bits and a 1024-slot window one step is
0.016 rad, and its calibrated range covers only the positions the calibration feeds reached (the
graph is wrong past them). A table ``[context, D]`` of float cos/sin values indexed by position has
the range [−1, 1] whatever the position, and its quantization step is set by the table alone.

Contract: in a static decoder graph (:mod:`qsvd_export.passes.static_shapes`), a ``Cos``/``Sin`` node
with output [1, n, D] whose input depends on one integer tensor ``P`` [1, n] and constants only —
``position_ids``, or the positions of every cache slot a latent graph derives from the mask
(:mod:`qsvd_export.passes.latent_kv`) — is replaced by ``Gather(table, P, axis=0)`` with
``table[p] = output at position p`` for ``p < context``, computed by running the original subgraph in
onnxruntime. A tabulation is kept only if the Gather reproduces the subgraph on shuffled positions
(float32 exact); otherwise that node is left as it was and the reason is reported.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import onnx_ir as ir

from qsvd_export.passes.contracts import GraphPass
from qsvd_export.passes._graph import backward_nodes

TABLE_SUFFIX = "_rotary_table"  # initializer names the npu QDQ overrides look for
_INTEGER = (ir.DataType.INT64, ir.DataType.INT32)


def _cone(value: ir.Value, stop: ir.Value | None = None) -> tuple[list[ir.Node], list[ir.Value]]:
    """Nodes ``value`` is computed from, nearest first (breadth-first, unlike ``_graph.backward_nodes``:
    :func:`index_source` must find the nearest integer tensor), not looking past ``stop``, and its
    non-constant leaves (graph inputs, or ``stop``)."""
    nodes: dict[int, ir.Node] = {}
    leaves: dict[int, ir.Value] = {}
    queue = [value]
    while queue:
        current = queue.pop(0)
        node = None if current is stop else current.producer()
        if node is None:
            if current is stop or not current.is_initializer():
                leaves[id(current)] = current
            continue
        if id(node) not in nodes:
            nodes[id(node)] = node
            queue.extend(v for v in node.inputs if v is not None)
    return list(nodes.values()), list(leaves.values())


def index_source(value: ir.Value, length: int) -> ir.Value | None:
    """The integer tensor [1, ``length``] nearest to ``value`` that ``value`` depends on alone."""
    nodes, leaves = _cone(value)
    candidates = [v for node in nodes for v in node.inputs
                  if v is not None and v.dtype in _INTEGER and not v.is_initializer()
                  and (v.shape is None or list(v.shape) == [1, length])]
    candidates += [v for v in leaves if v.dtype in _INTEGER]
    return next(iter(index_sources(value, dict.fromkeys(candidates))), None)


def index_sources(value: ir.Value, candidates: Iterable[ir.Value] | None = None) -> list[ir.Value]:
    """The non-constant integer tensors (of ``candidates``; default: any in its cone) that ``value`` is computed
    from alone, nearest first."""
    if candidates is None:
        nodes, leaves = _cone(value)
        candidates = dict.fromkeys([v for node in nodes for v in node.inputs if v is not None and v.dtype in _INTEGER
                                    and not v.is_initializer()] + [v for v in leaves if v.dtype in _INTEGER])
    return [c for c in candidates if [id(v) for v in _cone(value, stop=c)[1]] == [id(c)]]


def subgraph_session(model: ir.Model, source: ir.Value, outputs: list[ir.Value]) -> Any:
    """An onnxruntime session computing ``outputs`` from ``source`` ([1, n] int64) alone."""
    import onnx
    import onnxruntime as ort

    wanted = {id(n) for value in outputs for n in backward_nodes(value, stop={id(source)})}
    cone = [n for n in model.graph if id(n) in wanted]  # graph order is topological
    nodes = [ir.serde.serialize_node(n) for n in cone]
    used = {v.name for n in cone for v in n.inputs if v is not None}
    initializers = []
    for name, v in model.graph.initializers.items():
        if name in used and v.const_value is not None:
            tensor = ir.serde.serialize_tensor(v.const_value)
            tensor.name = name  # a folded Constant's tensor carries no name (the TorchScript exporter's do not)
            initializers.append(tensor)
    element = onnx.TensorProto.INT32 if source.dtype == ir.DataType.INT32 else onnx.TensorProto.INT64
    graph = onnx.helper.make_graph(
        nodes, "rotary_cone", [onnx.helper.make_tensor_value_info(source.name, element, None)],
        [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, None) for v in outputs], initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                          for d, v in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _tabulate(session: Any, source: ir.Value, names: list[str], length: int, context: int) -> list[np.ndarray] | str:
    """``[context, D]`` tables of each output, or why the outputs are not per-position [1, length, D]."""
    dtype = np.int32 if source.dtype == ir.DataType.INT32 else np.int64
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, context, length):
        positions = np.minimum(np.arange(start, start + length), context - 1).astype(dtype)[None]
        for chunk, value in zip(chunks, session.run(names, {source.name: positions})):
            if value.ndim != 3 or value.shape[:2] != (1, length):
                return f"output shape {value.shape} is not [1, {length}, D]"
            chunk.append(value[0])
    tables = [np.concatenate(chunk)[:context].astype(np.float32) for chunk in chunks]
    shuffled = np.random.default_rng(0).integers(0, context, size=(1, length)).astype(dtype)
    for table, value in zip(tables, session.run(names, {source.name: shuffled})):
        if not np.array_equal(table[shuffled[0]], value[0]):
            return "the subgraph's rows depend on more than their own position"
    return tables


def tabulate_rotary(model: ir.Model, context: int) -> dict[str, Any]:
    """Replace per-position Cos/Sin nodes of a static decoder ``model`` by table Gathers, in place.

    Returns ``{"rotary_tables": [table names]}``, plus ``"skipped": [reasons]`` for Cos/Sin nodes left."""
    groups: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    skipped = []
    for node in model.graph:
        if node.op_type not in ("Cos", "Sin") or node.domain not in ("", "ai.onnx"):
            continue
        shape = node.outputs[0].shape
        source = (index_source(node.inputs[0], int(shape[1])) if shape is not None and shape.is_static()
                  and len(shape) == 3 and shape[0] == 1 else None)
        if source is None:
            skipped.append(f"{node.name}: output is not [1, n, D] of one integer [1, n] tensor")
            continue
        groups.setdefault(id(source), (source, []))[1].append(node)
    tables: list[tuple[np.ndarray, ir.Value]] = []  # the same table serves every node that computes it
    for source, trig in groups.values():
        outputs = [n.outputs[0] for n in trig]
        length = int(outputs[0].shape[1])
        values = _tabulate(subgraph_session(model, source, outputs), source, [v.name for v in outputs], length, context)
        if isinstance(values, str):
            skipped += [f"{n.name}: {values}" for n in trig]
            continue
        for node, output, table in zip(trig, outputs, values):
            initializer = next((init for known, init in tables if np.array_equal(known, table)), None)
            if initializer is None:
                name = f"{output.name.replace('/', '_')}{TABLE_SUFFIX}"
                initializer = ir.Value(name=name, shape=ir.Shape(table.shape),
                                       type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(table, name=name))
                model.graph.register_initializer(initializer)
                tables.append((table, initializer))
            gather = ir.node("Gather", [initializer, source], attributes={"axis": 0}, name=f"{node.name}_table_gather")
            value, value.name = gather.outputs[0], output.name  # consumers and graph outputs keep the name
            output.name = f"{output.name}_computed"
            value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape([1, length, table.shape[1]])
            model.graph.insert_before(node, gather)
            output.replace_all_uses_with(value, replace_graph_outputs=True)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    result: dict[str, Any] = {"rotary_tables": [init.name for _, init in tables]}
    if skipped:
        result["skipped"] = skipped
    return result


class TabulateRotaryPass(GraphPass):
    """:func:`tabulate_rotary` as a pass (``self.report``). requires: a static graph (every input dim known).
    ensures: every Cos/Sin node left has its reason in ``report["skipped"]``."""

    def __init__(self, context: int) -> None:
        super().__init__()
        self.context = context
        self.report: dict[str, Any] = {}

    def requires(self, model: ir.Model) -> None:
        dynamic = [v.name for v in model.graph.inputs if v.shape is None or not v.shape.is_static()]
        if dynamic:
            raise self.precondition(f"rotary tables need a static graph; inputs {dynamic[:3]} are dynamic")

    def ensures(self, model: ir.Model) -> None:
        left = sum(1 for n in model.graph if n.op_type in ("Cos", "Sin") and n.domain in ("", "ai.onnx"))
        if left != len(self.report.get("skipped", [])):
            raise self.postcondition(f"{left} Cos/Sin nodes left, {len(self.report.get('skipped', []))} reasons")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = tabulate_rotary(model, self.context)
        return ir.passes.PassResult(model, bool(self.report["rotary_tables"]))
