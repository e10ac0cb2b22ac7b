"""unfuse_group_query_attention: onnxruntime's fused ``com.microsoft::GroupQueryAttention`` (what
onnxruntime-genai's model builder writes) rewritten into the explicit ops the graph stage matches, with the
op's own rotary embedding; the builder's fused RMSNorms are spelled out too, so the graph is differentiable.

Before (one layer of a builder fp32 graph)::

    qkv = MatMul(x, W_qkv)                                   # packed [B, S, (Hq + 2 Hkv) D]
    y, present_k, present_v = GroupQueryAttention(qkv, -, -, past_k, past_v, seqlens_k, total_len,
                                                  cos_cache, sin_cache)     # do_rotary = 1

After (the op's definition, with HF's position and mask conventions)::

    q, k, v = Split(qkv, [Hq D, Hkv D, Hkv D], axis=-1)
    q = RoPE(Transpose(Reshape(q, [0, 0, Hq, D]), [0, 2, 1, 3]), position_ids)     # [B, Hq, S, D]
    k = RoPE(Transpose(Reshape(k, [0, 0, Hkv, D]), [0, 2, 1, 3]), position_ids)
    v = Transpose(Reshape(v, [0, 0, Hkv, D]), [0, 2, 1, 3])
    present_k = Concat(past_k, k, axis=2); present_v = Concat(past_v, v, axis=2)   # the graph outputs
    scores = MatMul(Mul(q, scale), Transpose(repeat_kv(present_k), [0, 1, 3, 2])) + mask
    y = Reshape(Transpose(MatMul(Softmax(scores), repeat_kv(present_v)), [0, 2, 1, 3]), [0, 0, Hq D])

RoPE (``rotary_interleaved = 0``, rotate-half): ``x·cos + Concat(−x₂, x₁)·sin`` with
``cos = Unsqueeze(Gather(Concat(cos_cache, cos_cache, axis=-1), position_ids), 1)`` (the doubled table a
constant when the cache is one; the same for sin).
``position_ids`` is the op's optional input 9 when the graph gives it, else a new graph input
``position_ids`` [batch, sequence] (int64; ``CumSum(attention_mask) − 1`` of the new tokens, the convention
optimum and onnxruntime-genai feed, and the one :mod:`latent_kv` re-derives cached positions with).
The additive mask is HF's causal + padding mask from the graph's 2-D ``attention_mask`` [B, T] in the form
the project's own export writes (float ops only): key j is visible to new token i iff
``attention_mask[b, j] = 1`` and ``j ≤ T − S + i``. For unpadded rows (and
right padding) this is the op's own ``seqlens_k`` / ``total_sequence_length`` semantics; for a left-padded
first prompt the op instead places the prompt at positions 0…S−1, which this form (like HF) does not.

``SimplifiedLayerNormalization(x, γ)`` → ``γ · (x · Reciprocal(Sqrt(ReduceMean(x², −1) + ε)))`` (HF's form,
which the npu/gpu targets fuse back) and
``SkipSimplifiedLayerNormalization(x, skip, γ[, β])`` → the same on ``s = x + skip (+ bias)``, whose output 3
(the sum) becomes ``s``; only in graphs where a GroupQueryAttention node was rewritten.

Rewritten only in the builder's form: packed QKV (inputs 1, 2 empty), ``do_rotary`` 0 or 1 with
``rotary_interleaved = 0``, ``softcap = 0``, ``local_window_size = -1``, no ``smooth_softmax``, no attention
bias or head sink, no ``qk`` output in use, the graph has an ``attention_mask`` input. Other nodes are left
fused, each with its reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, const_array, initializer, repeat_kv_heads

MASK_INPUT, POSITION_INPUT = "attention_mask", "position_ids"
_CONTRIB = ("com.microsoft",)


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _why_not(node: ir.Node, graph: ir.Graph) -> str | None:
    """Why ``node`` (a GroupQueryAttention) is outside the rewritten form; None if it can be rewritten."""
    if _input(node, 1) is not None or _input(node, 2) is not None:
        return "separate key/value inputs (only the packed QKV form is unfused)"
    if _input(node, 3) is None or _input(node, 4) is None:
        return "no past_key/past_value inputs"
    if any(_input(node, i) is not None for i in (10, 11)):
        return "attention_bias or head_sink input"
    if len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output()):
        return "qk output in use"
    if _attr(node, "softcap", 0.0):
        return "softcap"
    if int(_attr(node, "local_window_size", -1)) != -1:
        return f"local_window_size {int(_attr(node, 'local_window_size', -1))} (sliding window)"
    if _attr(node, "smooth_softmax", 0):
        return "smooth_softmax"
    if _attr(node, "do_rotary", 0):
        if _attr(node, "rotary_interleaved", 0):
            return "rotary_interleaved=1"
        if _input(node, 7) is None or _input(node, 8) is None:
            return "do_rotary without cos/sin caches"
    if MASK_INPUT not in {v.name for v in graph.inputs}:
        return f"the graph has no '{MASK_INPUT}' input"
    heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        return f"head counts {heads} / {kv_heads} are not a positive multiple"
    if _head_dim(node) is None:
        return "head size unknown (no static packed QKV width)"
    return None


def _head_dim(node: ir.Node) -> int | None:
    heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
    past = node.inputs[3].shape if node.inputs[3] is not None else None
    if past is not None and past.rank() == 4 and isinstance(past[3], int):
        return int(past[3])
    packed = node.inputs[0].shape if node.inputs[0] is not None else None
    if packed is not None and packed.rank() == 3 and isinstance(packed[2], int):
        width = int(packed[2])
        if width % (heads + 2 * kv_heads) == 0:
            return width // (heads + 2 * kv_heads)
    weight = node.inputs[0].producer() if node.inputs[0] is not None else None
    if weight is not None and weight.op_type == "MatMul" and weight.inputs[1] is not None \
            and weight.inputs[1].shape is not None and isinstance(weight.inputs[1].shape[-1], int):
        width = int(weight.inputs[1].shape[-1])
        if width % (heads + 2 * kv_heads) == 0:
            return width // (heads + 2 * kv_heads)
    return None


def _typed(value: ir.Value, like: ir.Value | None = None, shape: list | None = None) -> ir.Value:
    value.dtype = ir.DataType.FLOAT if like is None or like.dtype is None else like.dtype
    if shape is not None:
        value.shape = ir.Shape(shape)
    return value


class _Rewriter:
    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._positions: ir.Value | None = None
        self._shared_mask: ir.Value | None = None
        self._tables: dict[tuple[int, str], ir.Value] = {}

    def positions(self) -> ir.Value:
        """The graph's ``position_ids`` input, added [batch, sequence] int64 if missing."""
        if self._positions is None:
            found = next((v for v in self.graph.inputs if v.name == POSITION_INPUT), None)
            if found is None:
                ids = next((v for v in self.graph.inputs if v.name == "input_ids"), None)
                dims = list(ids.shape) if ids is not None and ids.shape is not None and ids.shape.rank() == 2 \
                    else ["batch_size", "sequence_length"]
                found = ir.Value(name=POSITION_INPUT, shape=ir.Shape(dims), type=ir.TensorType(ir.DataType.INT64))
                mask_at = [v.name for v in self.graph.inputs].index(MASK_INPUT)
                self.graph.inputs.insert(mask_at + 1, found)
            if found.dtype != ir.DataType.INT64:
                found = add_node(self.graph, "Cast", [found], "qsvd/gqa/position_ids_int64",
                                 {"to": ir.DataType.INT64}).outputs[0]
            self._positions = found
        return self._positions

    def mask(self, q: ir.Value) -> ir.Value:
        """Additive [B, 1, S, T] mask, one for all layers: the project's float causal + padding mask
        (:func:`canonical_mask._build`: 0 where key j is visible to new token i, float32 min elsewhere; no
        boolean ops on the input, so it compiles on QNN HTP once shapes are static)."""
        if self._shared_mask is None:
            from qsvd_export.passes.canonical_mask import _build

            self._shared_mask = _build(self.graph, q, "qsvd/unfused_gqa/mask")
        return self._shared_mask

    def rope(self, x: ir.Value, cos_cache: ir.Value, sin_cache: ir.Value, head_dim: int, prefix: str) -> ir.Value:
        """Rotate-half RoPE of ``x`` [B, H, S, D] at ``position_ids`` with the op's [max_pos, D/2] tables."""
        g = self.graph
        positions = self.positions()
        half = head_dim // 2
        axis1 = initializer(g, f"{prefix}/axis1", np.asarray([1], dtype=np.int64))
        tables = []
        for name, cache in (("cos", cos_cache), ("sin", sin_cache)):
            table = self._tables.get((id(cache), name))
            if table is None:  # [max_pos, D/2] → [max_pos, D] once (a constant when the cache is one)
                half_table = const_array(cache)
                table = initializer(g, f"qsvd/unfused_gqa/{name}_table", np.concatenate([half_table, half_table], -1)
                                    .astype(half_table.dtype)) if half_table is not None else _typed(add_node(
                                        g, "Concat", [cache, cache], f"qsvd/unfused_gqa/{name}_table", {"axis": -1})
                                        .outputs[0], cache)
                self._tables[(id(cache), name)] = table
            rows = _typed(add_node(g, "Gather", [table, positions], f"{prefix}/{name}_rows", {"axis": 0}).outputs[0], cache)
            tables.append(_typed(add_node(g, "Unsqueeze", [rows, axis1], f"{prefix}/{name}").outputs[0], cache))
        cos, sin = tables
        starts = initializer(g, f"{prefix}/first_start", np.asarray([0], dtype=np.int64))
        middle = initializer(g, f"{prefix}/half", np.asarray([half], dtype=np.int64))
        end = initializer(g, f"{prefix}/end", np.asarray([head_dim], dtype=np.int64))
        last = initializer(g, f"{prefix}/last_axis", np.asarray([-1], dtype=np.int64))
        x1 = _typed(add_node(g, "Slice", [x, starts, middle, last], f"{prefix}/x1").outputs[0], x)
        x2 = _typed(add_node(g, "Slice", [x, middle, end, last], f"{prefix}/x2").outputs[0], x)
        minus = _typed(add_node(g, "Neg", [x2], f"{prefix}/minus_x2").outputs[0], x)
        rotated = _typed(add_node(g, "Concat", [minus, x1], f"{prefix}/rotate_half", {"axis": -1}).outputs[0], x)
        a = _typed(add_node(g, "Mul", [x, cos], f"{prefix}/x_cos").outputs[0], x)
        b = _typed(add_node(g, "Mul", [rotated, sin], f"{prefix}/rotated_sin").outputs[0], x)
        return _typed(add_node(g, "Add", [a, b], f"{prefix}/out").outputs[0], x)

    def heads(self, x: ir.Value, heads: int, head_dim: int, prefix: str) -> ir.Value:
        g = self.graph
        shape = initializer(g, f"{prefix}/shape", np.asarray([0, 0, heads, head_dim], dtype=np.int64))
        batch = x.shape[0] if x.shape is not None and x.shape.rank() == 3 else "batch_size"
        seq = x.shape[1] if x.shape is not None and x.shape.rank() == 3 else "sequence_length"
        split = _typed(add_node(g, "Reshape", [x, shape], f"{prefix}/split_heads").outputs[0], x,
                       [batch, seq, heads, head_dim])
        out = add_node(g, "Transpose", [split], f"{prefix}/bhsd", {"perm": [0, 2, 1, 3]}).outputs[0]
        return _typed(out, x, [batch, heads, seq, head_dim])

    def rewrite(self, node: ir.Node, index: int) -> None:
        g = self.graph
        prefix = f"qsvd/unfused_gqa{index}"
        heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        head_dim = _head_dim(node)
        assert head_dim is not None
        packed, past_k, past_v = node.inputs[0], node.inputs[3], node.inputs[4]
        sizes = initializer(g, f"{prefix}/split_sizes",
                            np.asarray([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dtype=np.int64))
        split = add_node(g, "Split", [packed, sizes], f"{prefix}/split_qkv", {"axis": -1}, num_outputs=3)
        for out, width in zip(split.outputs, (heads, kv_heads, kv_heads)):
            lead = list(packed.shape)[:2] if packed.shape is not None and packed.shape.rank() == 3 \
                else ["batch_size", "sequence_length"]
            _typed(out, packed, [*lead, width * head_dim])
        q = self.heads(split.outputs[0], heads, head_dim, f"{prefix}/q")
        k = self.heads(split.outputs[1], kv_heads, head_dim, f"{prefix}/k")
        v = self.heads(split.outputs[2], kv_heads, head_dim, f"{prefix}/v")
        if _attr(node, "do_rotary", 0):
            position = _input(node, 9)
            if position is not None:
                self._positions = position if position.dtype == ir.DataType.INT64 else add_node(
                    g, "Cast", [position], f"{prefix}/position_ids_int64", {"to": ir.DataType.INT64}).outputs[0]
            q = self.rope(q, node.inputs[7], node.inputs[8], head_dim, f"{prefix}/q_rope")
            k = self.rope(k, node.inputs[7], node.inputs[8], head_dim, f"{prefix}/k_rope")
        for past in (past_k, past_v):  # the builder names the head size 'kv_cache_dim': it is static
            if past.shape is not None and past.shape.rank() == 4 and not isinstance(past.shape[3], int):
                past.shape = ir.Shape([past.shape[0], past.shape[1], past.shape[2], head_dim])
        batch = past_k.shape[0] if past_k.shape is not None and past_k.shape.rank() == 4 else "batch_size"
        cache_shape = [batch, kv_heads, "total_sequence_length", head_dim]
        present_k = _typed(add_node(g, "Concat", [past_k, k], f"{prefix}/present_key", {"axis": 2}).outputs[0], past_k,
                           cache_shape)
        present_v = _typed(add_node(g, "Concat", [past_v, v], f"{prefix}/present_value", {"axis": 2}).outputs[0],
                           past_v, cache_shape)
        keys = repeat_kv_heads(g, present_k, heads, kv_heads, f"{prefix}/k_repeat")
        values = repeat_kv_heads(g, present_v, heads, kv_heads, f"{prefix}/v_repeat")
        scale = float(_attr(node, "scale", 0.0) or 1.0 / np.sqrt(head_dim))
        factor = initializer(g, f"{prefix}/scale", np.asarray(scale, dtype=np.float32))
        scaled = _typed(add_node(g, "Mul", [q, factor], f"{prefix}/q_scaled").outputs[0], q)
        k_t = _typed(add_node(g, "Transpose", [keys], f"{prefix}/k_t", {"perm": [0, 1, 3, 2]}).outputs[0], keys)
        scores = _typed(add_node(g, "MatMul", [scaled, k_t], f"{prefix}/scores").outputs[0], q)
        masked = _typed(add_node(g, "Add", [scores, self.mask(q)], f"{prefix}/masked").outputs[0], q)
        probs = _typed(add_node(g, "Softmax", [masked], f"{prefix}/softmax", {"axis": -1}).outputs[0], q)
        context = _typed(add_node(g, "MatMul", [probs, values], f"{prefix}/pv").outputs[0], q)
        merged = _typed(add_node(g, "Transpose", [context], f"{prefix}/bshd", {"perm": [0, 2, 1, 3]}).outputs[0], q)
        shape = initializer(g, f"{prefix}/merge_shape", np.asarray([0, 0, heads * head_dim], dtype=np.int64))
        out = add_node(g, "Reshape", [merged, shape], f"{prefix}/merge_heads").outputs[0]
        out.dtype, out.shape = node.outputs[0].dtype or ir.DataType.FLOAT, node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        for old, new in ((node.outputs[1], present_k), (node.outputs[2], present_v)):
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name = name  # present.i.key / .value keep their names
        g.remove(node, safe=True)


def _rms(graph: ir.Graph, x: ir.Value, gamma: ir.Value, epsilon: float, prefix: str) -> ir.Value:
    two = initializer(graph, f"{prefix}/two", np.asarray(2.0, dtype=np.float32))
    eps = initializer(graph, f"{prefix}/epsilon", np.asarray(epsilon, dtype=np.float32))
    axes = initializer(graph, f"{prefix}/axes", np.asarray([-1], dtype=np.int64))
    square = _typed(add_node(graph, "Pow", [x, two], f"{prefix}/square").outputs[0], x)
    mean = _typed(add_node(graph, "ReduceMean", [square, axes], f"{prefix}/mean", {"keepdims": 1}).outputs[0], x)
    shifted = _typed(add_node(graph, "Add", [mean, eps], f"{prefix}/plus_eps").outputs[0], x)
    root = _typed(add_node(graph, "Sqrt", [shifted], f"{prefix}/rms").outputs[0], x)
    inverse = _typed(add_node(graph, "Reciprocal", [root], f"{prefix}/inverse_rms").outputs[0], x)
    normed = _typed(add_node(graph, "Mul", [x, inverse], f"{prefix}/normed").outputs[0], x)
    # HF's order (γ · normed): the low-precision targets fuse this form back into SimplifiedLayerNormalization
    return _typed(add_node(graph, "Mul", [gamma, normed], f"{prefix}/scaled").outputs[0], x)


def _unfuse_norms(graph: ir.Graph) -> int:
    """Spell out (Skip)SimplifiedLayerNormalization nodes whose extra outputs (mean, inverse std) are unused."""
    done = 0
    for index, node in enumerate([n for n in graph if n.op_type in ("SimplifiedLayerNormalization",
                                                                    "SkipSimplifiedLayerNormalization")]):
        skip = node.op_type.startswith("Skip")
        if node.domain not in ("", "ai.onnx", *_CONTRIB):
            continue
        extra = node.outputs[1:3] if skip else node.outputs[1:]
        if any(o.uses() or o.is_graph_output() for o in extra):
            continue
        if not skip and int(_attr(node, "axis", -1)) not in (-1, (node.inputs[0].shape.rank() - 1)
                                                            if node.inputs[0].shape is not None else -1):
            continue
        prefix = f"qsvd/unfused_norm{index}"
        x = node.inputs[0]
        if skip:
            x = _typed(add_node(graph, "Add", [x, node.inputs[1]], f"{prefix}/skip_sum").outputs[0], node.inputs[0])
            bias = _input(node, 4)
            if bias is not None:
                x = _typed(add_node(graph, "Add", [x, bias], f"{prefix}/skip_bias").outputs[0], node.inputs[0])
            gamma = node.inputs[2]
        else:
            gamma = node.inputs[1]
        out = _rms(graph, x, gamma, float(_attr(node, "epsilon", 1e-5)), prefix)
        out.shape = node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        if skip and len(node.outputs) > 3:
            x.shape = node.outputs[3].shape
            node.outputs[3].replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        done += 1
    return done


def unfuse_group_query_attention(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every GroupQueryAttention node of the builder's form (and then the graph's fused RMSNorms), in
    place; nodes are appended, so sort topologically afterwards. Returns (rewritten, reasons for the rest)."""
    graph = model.graph
    found = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain in _CONTRIB]
    rewriter = _Rewriter(graph)
    left, done = [], 0
    for index, node in enumerate(found):
        why = _why_not(node, graph)
        if why is not None:
            left.append(f"{node.name or 'GroupQueryAttention'}: {why}")
            continue
        rewriter.rewrite(node, index)
        done += 1
    if done:
        _unfuse_norms(graph)
    return done, left
