"""Small graph helpers shared by the passes: constants, slices, cloning, naming."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is an initializer or the output of a Constant node, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.value.numpy()
        for key in ("value_float", "value_int"):
            if key in producer.attributes:
                return np.asarray(producer.attributes[key].value)
        for key in ("value_floats", "value_ints"):
            if key in producer.attributes:
                return np.asarray(list(producer.attributes[key].value))
    return None


def producer_op(value: ir.Value | None, op: str) -> ir.Node | None:
    """The node producing ``value`` when it is the standard-domain ``op``, else None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def matmul_weight(node: ir.Node, through_transpose: bool = True) -> np.ndarray | None:
    """The constant [K, N] weight of ``MatMul(x, W)``: W an initializer or a Constant node's 2-D output, or (with
    ``through_transpose``) ``Transpose(W)`` with perm (1, 0) of one; None for any other MatMul or node.

    The one answer to "which MatMul has a constant weight" for find_attention, quantize_weights and the npu
    weight ranges."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    b = node.inputs[1]
    weight = const_array(b)
    if weight is None and through_transpose and b is not None and b.producer() is not None:
        producer = b.producer()
        perm = producer.attributes.get("perm")  # type: ignore[union-attr]
        if producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx") \
                and (perm is None or list(perm.value) == [1, 0]):  # type: ignore[union-attr]
            inner = const_array(producer.inputs[0])  # type: ignore[union-attr]
            weight = None if inner is None else inner.T
    return weight if weight is not None and weight.ndim == 2 else None


def graph_inputs_reached(value: ir.Value, limit: int = 10_000) -> set[ir.Value]:
    """Graph inputs in the backward slice of ``value`` (initializers are constants, not inputs)."""
    seen: set[int] = set()
    found: set[ir.Value] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > limit:
            raise RecursionError("backward slice too large")
        if v.is_graph_input():
            found.add(v)
            continue
        producer = v.producer()
        if producer is None:
            continue
        stack.extend(i for i in producer.inputs if i is not None)
    return found


def is_constant_derived(value: ir.Value) -> bool:
    """True if no graph input feeds ``value`` (initializers and Constant nodes only)."""
    return not graph_inputs_reached(value)


def backward_nodes(value: ir.Value, stop: set[int]) -> list[ir.Node]:
    """Nodes in the backward slice of ``value``, not crossing values whose id is in ``stop``."""
    nodes: dict[int, ir.Node] = {}
    stack = [value]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if id(v) in seen or id(v) in stop:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is None:
            continue
        nodes[id(producer)] = producer
        stack.extend(i for i in producer.inputs if i is not None)
    return list(nodes.values())


def path_nodes(source: ir.Value, target: ir.Value, max_depth: int = 64) -> list[ir.Node] | None:
    """Nodes on some path from ``source`` to ``target`` (forward slice ∩ backward slice), None if none.

    The forward slice is explored breadth-first up to ``max_depth`` node levels; the backward walk from
    ``target`` stays inside it, so the cost is bounded by the graph size.
    """
    forward: dict[int, ir.Node] = {}
    frontier = [source]
    for _ in range(max_depth):
        following = []
        for value in frontier:
            for node in value.consumers():
                if id(node) not in forward:
                    forward[id(node)] = node
                    following.extend(node.outputs)
        if not following:
            break
        frontier = following
    found: dict[int, ir.Node] = {}
    stack, seen = [target], set()
    while stack:
        value = stack.pop()
        if id(value) in seen or value is source:
            continue
        seen.add(id(value))
        producer = value.producer()
        if producer is None or id(producer) not in forward:
            continue
        found[id(producer)] = producer
        stack.extend(i for i in producer.inputs if i is not None)
    return list(found.values()) or None


def topo_order(nodes: Iterable[ir.Node], graph: ir.Graph) -> list[ir.Node]:
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(nodes, key=lambda n: order.get(id(n), 1 << 60))


def clone_nodes(
    nodes: list[ir.Node], mapping: dict[int, ir.Value], graph: ir.Graph, prefix: str,
    replace_input=None,  # type: ignore[no-untyped-def]
) -> dict[int, ir.Value]:
    """Clone ``nodes`` (topologically ordered) into ``graph``; inputs found in ``mapping`` (by id) are remapped.

    ``replace_input(node, index, value)`` may return a substitute for an external input. Returns the
    extended mapping (old value id → new value).
    """
    for node in nodes:
        inputs = []
        for index, value in enumerate(node.inputs):
            if value is not None and id(value) in mapping:
                inputs.append(mapping[id(value)])
            elif replace_input is not None:
                inputs.append(replace_input(node, index, value))
            else:
                inputs.append(value)
        clone = ir.Node(
            node.domain, node.op_type, inputs,
            attributes=[attr for attr in node.attributes.values()],
            num_outputs=len(node.outputs), name=f"{prefix}/{node.op_type}_{len(graph)}",
            version=node.version,
        )
        for old, new in zip(node.outputs, clone.outputs):
            new.name = f"{prefix}/{old.name}" if old.name else None
            new.dtype = old.dtype
            mapping[id(old)] = new
        graph.append(clone)
    return mapping


def initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Register a new initializer (name made unique) and return its value. ``dtype``: the ONNX type when
    numpy has none for it (INT4 values held in an int8 array)."""
    base, k = name, 1
    while name in graph.initializers:
        name = f"{base}_{k}"
        k += 1
    tensor = ir.tensor(array, name=name) if dtype is None else ir.Tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def add_node(graph: ir.Graph, op: str, inputs: list[ir.Value | None], name: str,
             attributes: dict | None = None, num_outputs: int = 1, domain: str = "") -> ir.Node:
    """Append a node with deterministic value names ``{name}`` / ``{name}:k``."""
    from onnx_ir.convenience import convert_attributes

    node = ir.Node(domain, op, inputs, attributes=convert_attributes(attributes or {}), num_outputs=num_outputs, name=name)
    for k, out in enumerate(node.outputs):
        out.name = name if num_outputs == 1 else f"{name}:{k}"
    graph.append(node)
    return node


def typed(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None = None) -> ir.Value:
    """``value`` with its element type and shape set (shape None: unknown)."""
    value.dtype, value.shape = dtype, shape
    return value


def slice_axis(graph: ir.Graph, x: ir.Value, start: int, end: int, axis: int, name: str) -> ir.Value:
    """``x[start:end]`` on ``axis`` (constant bounds as initializers ``{name}/starts|ends|axes``); untyped output."""
    bounds = [initializer(graph, f"{name}/{key}", np.asarray([v], np.int64))
              for key, v in (("starts", start), ("ends", end), ("axes", axis))]
    return add_node(graph, "Slice", [x, *bounds], name).outputs[0]


def repeat_kv_heads(graph: ir.Graph, x: ir.Value, heads: int, kv_heads: int, prefix: str) -> ir.Value:
    """[B, Hkv, T, D] → [B, H, T, D], each KV head repeated H / Hkv times (HF's repeat_kv: Unsqueeze(axis 2) →
    Expand → Reshape), the form find_attention and the latent passes match; ``x`` itself when H == Hkv."""
    if heads == kv_heads:
        return x
    rep = heads // kv_heads
    axes = initializer(graph, f"{prefix}/axes", np.asarray([2], dtype=np.int64))
    unsq = add_node(graph, "Unsqueeze", [x, axes], f"{prefix}/unsqueeze").outputs[0]
    shape = initializer(graph, f"{prefix}/expand_shape", np.asarray([1, 1, rep, 1, 1], dtype=np.int64))
    expanded = add_node(graph, "Expand", [unsq, shape], f"{prefix}/expand").outputs[0]
    dims = list(x.shape)
    target = initializer(graph, f"{prefix}/shape", np.asarray([0, heads, -1, int(dims[3])], dtype=np.int64))
    out = add_node(graph, "Reshape", [expanded, target], f"{prefix}/heads").outputs[0]
    out.dtype, out.shape = x.dtype, ir.Shape([dims[0], heads, dims[2], dims[3]])
    return out
