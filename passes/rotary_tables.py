"""``rotary_tables``: rotary cos/sin computed from ``position_ids`` → Gather from precomputed tables.

A decoder computes its rotary embedding as ``cos(position · inv_freq)`` / ``sin(...)``. Quantized, the
angle tensor spans ``[0, context · max inv_freq]``: at 16 bits and a 1024-slot window one step is
0.016 rad, and its calibrated range covers only the positions the calibration feeds reached (the
graph is wrong past them). A table ``[context, D]`` of float cos/sin values indexed by position has
the range [−1, 1] whatever the position, and its quantization step is set by the table alone.

Contract: in a static decoder graph (:mod:`qsvd_export.passes.static_shapes`), every ``Cos``/``Sin``
node whose input depends on no graph input but ``position_ids`` ([1, seq] int64) and whose output is
[1, seq, D] is replaced by ``Gather(table, position_ids, axis=0)`` with ``table[p] = output at
position p`` for ``p < context``, computed by running the original subgraph in onnxruntime. A
tabulation is kept only if the Gather reproduces the subgraph on shuffled positions (float32 exact);
otherwise the graph is left as it was and the reason is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

TABLE_SUFFIX = "_rotary_table"  # initializer names the npu QDQ overrides look for
_POSITIONS = "position_ids"


def _cone(value: ir.Value) -> tuple[list[ir.Node], set[str]]:
    """Nodes ``value`` is computed from (any order) and the graph inputs they read."""
    nodes: dict[int, ir.Node] = {}
    inputs: set[str] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer()
        if node is None:
            if not current.is_initializer() and current.name:
                inputs.add(current.name)
            continue
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        stack.extend(v for v in node.inputs if v is not None)
    return list(nodes.values()), inputs


def _subgraph_session(model: ir.Model, outputs: list[ir.Value]) -> Any:
    """An onnxruntime session computing ``outputs`` from ``position_ids`` alone."""
    import onnx
    import onnxruntime as ort

    wanted: dict[int, ir.Node] = {}
    for value in outputs:
        wanted.update({id(n): n for n in _cone(value)[0]})
    nodes = [ir.serde.serialize_node(n) for n in model.graph if id(n) in wanted]  # graph order is topological
    used = {v.name for n in wanted.values() for v in n.inputs if v is not None}
    initializers = [ir.serde.serialize_tensor(v.const_value) for name, v in model.graph.initializers.items()
                    if name in used and v.const_value is not None]
    position = next(v for v in model.graph.inputs if v.name == _POSITIONS)
    graph = onnx.helper.make_graph(
        nodes, "rotary_cone",
        [onnx.helper.make_tensor_value_info(_POSITIONS, onnx.TensorProto.INT64, list(position.shape))],
        [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, None) for v in outputs],
        initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                          for d, v in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _tabulate(session: Any, names: list[str], seq: int, context: int) -> list[np.ndarray] | str:
    """``[context, D]`` tables of each output, or why the outputs are not per-position [1, seq, D]."""
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, context, seq):
        positions = np.minimum(np.arange(start, start + seq, dtype=np.int64), context - 1)[None]
        for chunk, value in zip(chunks, session.run(names, {_POSITIONS: positions})):
            if value.ndim != 3 or value.shape[:2] != (1, seq):
                return f"output shape {value.shape} is not [1, {seq}, D]"
            chunk.append(value[0])
    tables = [np.concatenate(chunk)[:context].astype(np.float32) for chunk in chunks]
    shuffled = np.random.default_rng(0).integers(0, context, size=(1, seq), dtype=np.int64)
    for table, value in zip(tables, session.run(names, {_POSITIONS: shuffled})):
        if not np.array_equal(table[shuffled[0]], value[0]):
            return "the subgraph's rows depend on more than their own position"
    return tables


def tabulate_rotary(model: ir.Model, context: int) -> dict[str, Any]:
    """Replace position-only Cos/Sin nodes of a static decoder ``model`` by table Gathers, in place.

    Returns ``{"rotary_tables": [names], "skipped": reason}`` (``skipped`` only when nothing was done)."""
    position = next((v for v in model.graph.inputs if v.name == _POSITIONS), None)
    if position is None or position.shape is None or not position.shape.is_static():
        return {"rotary_tables": [], "skipped": "no static position_ids input"}
    trig = [n for n in model.graph if n.op_type in ("Cos", "Sin") and n.domain in ("", "ai.onnx")
            and _cone(n.inputs[0])[1] == {_POSITIONS}]
    if not trig:
        return {"rotary_tables": [], "skipped": "no Cos/Sin computed from position_ids alone"}
    outputs = [n.outputs[0] for n in trig]
    seq = int(position.shape[1])
    tables = _tabulate(_subgraph_session(model, outputs), [v.name for v in outputs], seq, context)
    if isinstance(tables, str):
        return {"rotary_tables": [], "skipped": tables}
    names = []
    for node, output, table in zip(trig, outputs, tables):
        name = f"{output.name}{TABLE_SUFFIX}"
        initializer = ir.Value(name=name, shape=ir.Shape(table.shape), type=ir.TensorType(ir.DataType.FLOAT),
                               const_value=ir.tensor(table, name=name))
        model.graph.register_initializer(initializer)
        gather = ir.node("Gather", [initializer, position], attributes={"axis": 0}, name=f"{node.name}_table_gather")
        value, value.name = gather.outputs[0], output.name  # consumers and graph outputs keep the name
        output.name = f"{output.name}_computed"
        value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape([1, seq, table.shape[1]])
        model.graph.insert_before(node, gather)
        output.replace_all_uses_with(value, replace_graph_outputs=True)
        names.append(name)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return {"rotary_tables": names}
