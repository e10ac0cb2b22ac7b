"""canonical_mask: the sdpa lowering's boolean attention mask of a causal decoder → the project's float
additive mask, and the Softmax NaN guard after it dropped.

The TorchScript exporter (and optimum, which uses it) lowers HF's sdpa mask as boolean tensor arithmetic
(ConstantOfShape, Equal, And, Expand of computed shapes, ``Where(mask, 0, -inf)``) added to the scores,
and guards the Softmax with ``Where(IsNaN(P), 0, P)``. None of these run on QNN HTP (no boolean select,
no IsNaN), and the mask's -inf gives NaN for fully masked rows. For a decoder block with a KV cache whose
mask operand depends (apart from Shape reads) on ``attention_mask`` and ``position_ids`` only, the operand
becomes the mask this project's own export writes (``export.additive_causal_mask``)::

    allowed[i, j] = j <= T − S + i                     # T = attention_mask length, S = new tokens
    keep = Cast(allowed, float)[None, None] · Cast(attention_mask, float)[:, None, None, :]
    mask = (1 − keep) · float32_min

Once a graph's shapes are static the causal part folds to a constant and only Cast/Mul/Sub remain on the
input. The rewrite is kept only if the original mask operand, evaluated (onnx reference ops) on its own
backward slice for left-padded, right-padded and cached feeds, masks exactly the keys the new mask masks
(sliding windows, packed sequences or anything else would differ and leave the block as it was). With the
mask finite a Softmax row cannot be NaN, so the block's NaN guard ``Where(IsNaN(P), c, P)`` is removed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, backward_nodes, const_array, initializer, topo_order

MASK_INPUT = "attention_mask"
_ALLOWED_INPUTS = {MASK_INPUT, "position_ids"}
_MASKED = -1e30  # a score at or below this is a masked key
# (new tokens S, cached tokens P, attention_mask row): left padding, right padding, cached step
_CHECKS = ((3, 5, [0, 0, 1, 1, 1, 1, 1, 1]), (4, 0, [1, 1, 1, 0]), (1, 6, [1, 1, 1, 1, 1, 1, 1]), (5, 0, [1] * 5))


def _mask_operand(block: Any) -> tuple[ir.Node, int] | None:
    """(Add node, input index) of the additive mask on the scores → Softmax path, if there is one."""
    from qsvd_export.passes.find_attention import _leads_to_matmul

    value = block.softmax.inputs[0]
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None or node is block.scores:
            return None
        if node.op_type == "Add" and len(node.inputs) == 2:
            for side in (0, 1):
                other = node.inputs[1 - side]
                if other is not None and (other.producer() is block.scores or _leads_to_matmul(other)):
                    return node, side
            return None
        if node.op_type not in ("Mul", "Div", "Cast", "Identity"):
            return None
        value = next((i for i in node.inputs if i is not None and const_array(i) is None), None)
    return None


def _data_inputs(value: ir.Value) -> set[str] | None:
    """Graph inputs ``value`` depends on other than through Shape nodes (None if the slice is too large)."""
    found: set[str] = set()
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > 5000:
            return None
        if v.is_graph_input():
            found.add(v.name or "")
            continue
        producer = v.producer()
        if producer is None or producer.op_type in ("Shape", "Size"):
            continue
        stack.extend(i for i in producer.inputs if i is not None)
    return found


def _evaluate(value: ir.Value, graph: ir.Graph, feeds: dict[str, np.ndarray],
              given: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """``value`` computed from ``feeds`` (graph inputs by name) and ``given`` (values by id, not looked past)
    by running its backward slice node by node with onnx's reference ops."""
    values: dict[int, Any] = given if given is not None else {}  # filled in: a cache across calls
    for node in topo_order(backward_nodes(value, set(values)), graph):
        inputs = []
        for i in node.inputs:
            if i is None:
                inputs.append(None)
            elif id(i) in values:
                inputs.append(values[id(i)])
            elif i.is_graph_input():
                inputs.append(feeds[i.name])
            elif i.const_value is not None:
                inputs.append(i.const_value.numpy())
            else:
                raise ValueError(f"no value for {i.name}")
        values.update(_run_node(node, graph, inputs))
    return values[id(value)] if id(value) in values else feeds[value.name]


def _feeds(graph: ir.Graph, new: int, past: int, mask: list[int]) -> dict[str, np.ndarray]:
    row = np.asarray([mask], dtype=np.int64)
    feeds = {}
    for value in graph.inputs:
        name = value.name or ""
        if name == MASK_INPUT:
            feeds[name] = row
        elif name == "position_ids":
            feeds[name] = np.maximum(np.cumsum(row, axis=1) - 1, 0)[:, -new:]
        elif name in ("input_ids", "token_type_ids"):
            feeds[name] = np.ones((1, new), dtype=np.int64)
        elif value.shape is not None and value.shape.rank() == 4:  # a dense cache input
            dims = [d if isinstance(d, int) else 1 for d in value.shape]
            dims[0], dims[2] = 1, past
            feeds[name] = np.zeros(dims, dtype=np.float32)
        elif value.shape is not None and value.shape.rank() == 3:  # a latent cache input
            feeds[name] = np.zeros([1, past] + [d if isinstance(d, int) else 1 for d in value.shape][2:], np.float32)
    return feeds


def _masked(array: np.ndarray, new: int, total: int) -> np.ndarray:
    full = np.broadcast_to(np.asarray(array, dtype=np.float64), (1, 1, new, total))
    return (full <= _MASKED) | np.isneginf(full)


def _build(graph: ir.Graph, scores: ir.Value, prefix: str) -> ir.Value:
    """The project's additive causal + padding mask [B, 1, S, T] (``export.additive_causal_mask``)."""
    mask = next(v for v in graph.inputs if v.name == MASK_INPUT)
    one_i = initializer(graph, f"{prefix}/one_int", np.asarray(1, dtype=np.int64))
    zero_i = initializer(graph, f"{prefix}/zero_int", np.asarray(0, dtype=np.int64))
    axis0 = initializer(graph, f"{prefix}/axis0", np.asarray([0], dtype=np.int64))
    total = add_node(graph, "Shape", [mask], f"{prefix}/total", {"start": 1, "end": 2}).outputs[0]
    rank = scores.shape.rank() if scores.shape is not None else 4
    new = add_node(graph, "Shape", [scores], f"{prefix}/new", {"start": rank - 2, "end": rank - 1}).outputs[0]
    total_s = add_node(graph, "Squeeze", [total, axis0], f"{prefix}/total_scalar").outputs[0]
    new_s = add_node(graph, "Squeeze", [new, axis0], f"{prefix}/new_scalar").outputs[0]
    start = add_node(graph, "Sub", [total_s, new_s], f"{prefix}/past").outputs[0]
    rows = add_node(graph, "Range", [start, total_s, one_i], f"{prefix}/query_positions").outputs[0]
    cols = add_node(graph, "Range", [zero_i, total_s, one_i], f"{prefix}/key_positions").outputs[0]
    last = initializer(graph, f"{prefix}/axis_last", np.asarray([-1], dtype=np.int64))
    rows_c = add_node(graph, "Unsqueeze", [rows, last], f"{prefix}/query_column").outputs[0]
    allowed = add_node(graph, "LessOrEqual", [cols, rows_c], f"{prefix}/allowed").outputs[0]
    allowed_f = add_node(graph, "Cast", [allowed], f"{prefix}/allowed_float", {"to": ir.DataType.FLOAT}).outputs[0]
    mask_f = add_node(graph, "Cast", [mask], f"{prefix}/mask_float", {"to": ir.DataType.FLOAT}).outputs[0]
    axes = initializer(graph, f"{prefix}/axes12", np.asarray([1, 2], dtype=np.int64))
    mask_4d = add_node(graph, "Unsqueeze", [mask_f, axes], f"{prefix}/mask_4d").outputs[0]
    keep = add_node(graph, "Mul", [allowed_f, mask_4d], f"{prefix}/keep").outputs[0]
    one = initializer(graph, f"{prefix}/one", np.asarray(1.0, dtype=np.float32))
    drop = add_node(graph, "Sub", [one, keep], f"{prefix}/drop").outputs[0]
    lowest = initializer(graph, f"{prefix}/lowest", np.asarray(np.finfo(np.float32).min, dtype=np.float32))
    out = add_node(graph, "Mul", [drop, lowest], f"{prefix}/mask").outputs[0]
    for v in (allowed_f, mask_f, mask_4d, keep, drop, out):
        v.dtype = ir.DataType.FLOAT
    return out


def _drop_nan_guard(block: Any, dry_run: bool = False) -> bool:
    """Remove the block's Softmax NaN guard (``dry_run``: only say whether it has one)."""
    from qsvd_export.passes.find_attention import _is_nan_guard

    value = block.softmax.outputs[0]
    for _ in range(4):
        guards = [c for c in value.consumers() if _is_nan_guard(c, value)]
        if guards:
            if not dry_run:
                guards[0].outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)
            return True
        passthrough = [c for c in value.consumers() if c.op_type in ("Cast", "Identity")]
        if not passthrough:
            return False
        value = passthrough[0].outputs[0]
    return False


def canonicalize_masks(model: ir.Model, blocks: list[Any]) -> tuple[int, list[str]]:
    """Rewrite the mask of every cached decoder block that qualifies (see the module docstring), in place; one
    new mask serves every block. Returns (blocks rewritten, reasons for the others)."""
    graph = model.graph
    if MASK_INPUT not in {v.name for v in graph.inputs}:
        return 0, []
    done, left = 0, []
    new_mask: ir.Value | None = None
    scores: ir.Value | None = None
    checks = [(_feeds(graph, new, past, row), new, new + past, {}, {}) for new, past, row in _CHECKS]
    chosen = []
    for block in blocks:  # every check runs on the untouched graph: later masks may read earlier blocks' shapes
        if not _drop_nan_guard(block, dry_run=True):
            continue  # no sdpa lowering here (this project's own exports: a float mask, no guard)
        found = _mask_operand(block) if block.k_cache is not None else None
        if found is None:
            continue
        add, side = found
        operand = add.inputs[side]
        if (operand.producer() is not None and (operand.producer().name or "").startswith("qsvd/")) \
                or const_array(operand) is not None:
            continue  # ours already, or a constant
        inputs = _data_inputs(operand)
        if inputs is None or MASK_INPUT not in inputs or not inputs <= _ALLOWED_INPUTS:
            left.append(f"attention block {block.index}: mask kept (it depends on {sorted(inputs or [])})")
            continue
        if new_mask is None:
            scores = add.inputs[1 - side]
            new_mask = _build(graph, scores, "qsvd/canonical_mask")
        why = _differs(graph, operand, new_mask, scores, checks)
        if why is not None:
            left.append(f"attention block {block.index}: mask kept ({why})")
            continue
        chosen.append((block, add, side))
    for block, add, side in chosen:
        add.replace_input_with(side, new_mask)
        _drop_nan_guard(block)
        done += 1
    if new_mask is not None and not done:
        _remove_unused(graph, new_mask)
    return done, left


def _differs(graph: ir.Graph, operand: ir.Value, new_mask: ir.Value, scores: ir.Value, checks: list) -> str | None:
    """Why ``operand`` is not the canonical mask on the check feeds (None: it masks the same keys, adds 0 elsewhere)."""
    for feeds, new, total, original_cache, new_cache in checks:
        try:
            original = _evaluate(operand, graph, feeds, original_cache)
            if id(new_mask) not in new_cache:
                new_cache[id(scores)] = np.zeros([1, 1, new, total], np.float32)
            candidate = _evaluate(new_mask, graph, feeds, new_cache)
        except Exception as exc:  # noqa: BLE001 - any evaluation failure: keep the original mask
            return f"its mask could not be evaluated ({exc.__class__.__name__}: {str(exc)[:80]})"
        try:
            masked, expected = _masked(original, new, total), _masked(candidate, new, total)
        except ValueError:  # not broadcastable to [1, 1, S, T]
            return "its mask does not have the scores' shape"
        if not np.array_equal(masked, expected):
            return "it masks other keys than the causal + padding mask (sliding window or packed sequences?)"
        visible = np.broadcast_to(np.asarray(original, np.float64), (1, 1, new, total))[~masked]
        if visible.size and np.abs(visible).max() > 0:
            return "it adds a bias to visible keys"
    return None


def _run_node(node: ir.Node, graph: ir.Graph, inputs: list[Any]) -> dict[int, Any]:
    import onnx
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if x is not None else "" for k, x in enumerate(inputs)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [f"o{k}" for k in range(len(node.outputs))]
    del proto.output[:]
    proto.output.extend(outs)
    opset = [onnx.helper.make_opsetid(node.domain, node.version or graph.opset_imports.get(node.domain, 21))]
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [proto], "n", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names if n],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs]), opset_imports=opset)
    results = ReferenceEvaluator(model).run(None, {n: x for n, x in zip(names, inputs) if n})
    return {id(out): result for out, result in zip(node.outputs, results)}


def _remove_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the nodes of a built mask nobody reads (its value and its producers, backwards)."""
    stack = [value]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None or any(o.uses() for o in node.outputs) or not (node.name or "").startswith("qsvd/"):
            continue
        graph.remove(node, safe=True)
        stack.extend(i for i in node.inputs if i is not None)
