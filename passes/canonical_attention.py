"""canonical_attention: the exporters' sdpa forms of an attention block rewritten into the forms the latent
passes verify (fold_value, absorb_key), with the same values.

- repeat_kv with computed shapes (the TorchScript sdpa lowering for GQA): ``Unsqueeze(axis 2) → Expand(x,
  shape from Shape/Gather/Where) → Reshape(·, shape from Shape/Concat)`` between the cache and Q·Kᵀ or P·V
  gets constant shapes ``[1, 1, rep, 1, 1]`` and ``[0, H, -1, D]`` when the heads and head size are static
  (the computed ones describe the same tensor), so the shape arithmetic on the cache goes dead.
- a scalar constant scale on the K side of Q·Kᵀ (sdpa scales Q and K by √scale each) moves to the Q side:
  ``(Q·a)·(Kᵀ·b) = (Q·a·b)·Kᵀ``, so the keys reach Q·Kᵀ through a Transpose only.
- the sdpa lowering's boolean causal mask of a cached decoder block → the project's float additive mask, and
  the Softmax NaN guard dropped (:mod:`canonical_mask`, checked against the original mask on sample feeds).

Untyped values (TorchScript exports) get their element types first (:mod:`infer_dtypes`; not counted).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, const_array, initializer


def _static(shape: ir.Shape | None, *axes: int) -> list[int] | None:
    if shape is None:
        return None
    dims = [shape[a] for a in axes]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def _constant_repeat(graph: ir.Graph, value: ir.Value, prefix: str) -> bool:
    """Give the repeat_kv chain ending in ``value`` (a Reshape output) constant shapes; True if changed."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return False
    expand = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand" or len(expand.outputs[0].uses()) != 1:
        return False
    unsqueeze = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return False
    axes = const_array(unsqueeze.inputs[1])
    if axes is None or [int(a) for a in np.atleast_1d(axes)] != [2]:
        return False
    if const_array(expand.inputs[1]) is not None and const_array(reshape.inputs[1]) is not None:
        return False  # already constant
    source = unsqueeze.inputs[0].shape if unsqueeze.inputs[0] is not None else None
    kv = _static(source, 1, 3) if source is not None and source.rank() == 4 else None
    out = _static(reshape.outputs[0].shape, 1, 3) if reshape.outputs[0].shape is not None \
        and reshape.outputs[0].shape.rank() == 4 else None
    if kv is None or out is None or out[1] != kv[1] or out[0] % kv[0]:
        return False
    heads, kv_heads, head_dim = out[0], kv[0], kv[1]
    expand.replace_input_with(1, initializer(graph, f"{prefix}/expand_shape",
                                             np.asarray([1, 1, heads // kv_heads, 1, 1], dtype=np.int64)))
    reshape.replace_input_with(1, initializer(graph, f"{prefix}/heads_shape",
                                              np.asarray([0, heads, -1, head_dim], dtype=np.int64)))
    if "allowzero" in reshape.attributes:
        reshape.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    return True


def _move_key_scale(graph: ir.Graph, scores: ir.Node, prefix: str) -> bool:
    """``MatMul(q, Mul(k_t, c))`` with a scalar constant c → ``MatMul(Mul(q, c), k_t)``; True if changed."""
    k_side = scores.inputs[1]
    mul = k_side.producer() if k_side is not None else None
    if mul is None or mul.op_type != "Mul" or len(k_side.uses()) != 1:
        return False
    for data, other in ((0, 1), (1, 0)):
        scale = const_array(mul.inputs[other])
        if scale is not None and scale.size == 1 and mul.inputs[data] is not None and const_array(mul.inputs[data]) is None:
            break
    else:
        return False
    factor = initializer(graph, f"{prefix}/key_scale", np.asarray(scale.reshape(()), dtype=np.float32))
    scaled = add_node(graph, "Mul", [scores.inputs[0], factor], f"{prefix}/q_times_key_scale").outputs[0]
    if scores.inputs[0].dtype is not None:  # a shape without a type cannot be serialized (TorchScript graphs)
        scaled.dtype, scaled.shape = scores.inputs[0].dtype, scores.inputs[0].shape
    scores.replace_input_with(0, scaled)
    scores.replace_input_with(1, mul.inputs[data])
    return True


def canonicalize_attention(model: ir.Model) -> int:
    """Apply both rewrites to every attention block find_attention matches; returns how many changes."""
    from onnx_ir.passes import common

    from qsvd_export.passes.canonical_mask import canonicalize_masks
    from qsvd_export.passes.find_attention import find_attention
    from qsvd_export.passes.infer_dtypes import infer_dtypes

    graph = model.graph
    changed = 0
    infer_dtypes(model)  # TorchScript graphs leave most values untyped; the passes copy neighbours' dtypes
    blocks = find_attention(model).blocks
    # masks first: their checks evaluate the untouched graph, and a later block's mask may read the shape of an
    # earlier block's query, which the key-scale move below replaces
    changed += canonicalize_masks(model, blocks)[0]
    for block in blocks:
        prefix = f"qsvd/canonical{block.index}"
        changed += _constant_repeat(graph, block.pv.inputs[1], f"{prefix}/v")
        key = block.scores.inputs[1]
        if _move_key_scale(graph, block.scores, prefix):
            changed += 1
            key = block.scores.inputs[1]
        transpose = key.producer() if key is not None else None
        if transpose is not None and transpose.op_type == "Transpose":
            changed += _constant_repeat(graph, transpose.inputs[0], f"{prefix}/k")
    if changed:
        common.TopologicalSortPass()(model)
        common.RemoveUnusedNodesPass()(model)
    return changed
