"""``fold_latent_scales``: the 8- or 4-bit latent cache's per-channel scales move out of the per-step dequantize.

Before (:mod:`quantize_latent_cache`): ``latent = DequantizeLinear(stored, s, z, axis=2)`` [batch, seq, r], ``stored``
the codes of ``present.i.latent`` (the output itself for 8-bit codes, its unpacked nibbles for 4-bit),
multiplies every cached element by its channel scale at every decode step (ONNX Runtime's per-axis
DequantizeLinear: 0.68 ms for 2,048 × 192 values on 2 cores, 7× a Cast), and its readers read the float latent.

After: the cache is read as ``codes = code − z`` in float (``Cast`` for z = 0, else a per-tensor
``DequantizeLinear(stored, 1, z)``; exact) and each reader takes ``s`` where it is cheap:

- ``MatMulNBits(latent, W)`` (the key rebuild, K = r, M = the cached tokens): with uint8 codes it becomes
  ``com.microsoft.MatMulIntegerToFloat(stored, W_q, 1, w, z)`` straight on the codes, W_q int8 per output column
  (scale w) of W' = diag(s) · W, W the node's dequantized weight. ONNX Runtime's uint8 × int8 GEMM is the fast
  kernel here (smollm2 kv=0.5 at 2,048 cached tokens, profiled: 15 ms per step over 30 layers for a float MatMul,
  38 ms for MatMulNBits, 4–6 ms for this); re-quantizing W' per column keeps the dev perplexity (24.176 vs 24.170
  with the float MatMul, 8 × 512 tokens). With int8 codes it becomes a float ``MatMul(codes, W')`` (int8 × int8
  has no fast path);
- ``MatMul(latent, W)`` with a constant W [r, N]: W' = diag(s) · W, exact;
- ``MatMul(P, Unsqueeze…(latent))`` (the attention-weighted latent of :mod:`fold_value`): the product's last axis
  is the latent channel, so ``Mul(product, s)`` acts on [batch, heads, new, r] instead of the cache;
- any other reader reads ``Mul(codes, s)``.

The graph computes the same function up to float rounding and the per-column rounding of W'.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import replace_nodes_and_values
from onnx_ir.passes import common

from qsvd_export.passes._graph import add_node, const_array, initializer
from qsvd_export.passes.contracts import GraphPass
from qsvd_export.passes.quantize_latent_cache import latent_codes_predicate


def latent_dequantizers(graph: ir.Graph) -> list[ir.Node]:
    """The ``DequantizeLinear(codes, s, z, axis=2)`` nodes with a constant per-channel scale and one zero point for
    every channel, where ``codes`` is ``present.i.latent`` or its unpacked 4-bit codes."""
    is_latent_codes = latent_codes_predicate(graph)
    found = []
    for node in graph:
        codes = node.inputs[0] if node.inputs else None
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or not is_latent_codes(codes):
            continue
        scale = const_array(node.inputs[1])
        zero = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        axis = node.attributes.get("axis")
        if scale is None or scale.ndim != 1 or (zero is not None and np.unique(zero).size != 1) \
                or axis is None or axis.as_int() not in (2, -1):
            continue
        found.append(node)
    return found


def _nbits_weight(node: ir.Node) -> np.ndarray | None:
    """W [K, N] float32 that a MatMulNBits node with constant weights (no g_idx) multiplies by."""
    from qsvd_export.quant.matmul_nbits import unpack_matmulnbits

    attrs = {k: v.value for k, v in node.attributes.items()}
    packed, scales = (const_array(v) for v in node.inputs[1:3])
    zeros = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if packed is None or scales is None or "block_size" not in attrs or attrs.get("bits", 4) not in (4, 8) \
            or len(node.inputs) > 4 and node.inputs[4] is not None:
        return None
    return unpack_matmulnbits(packed, scales, zeros, attrs["K"], attrs["N"], attrs.get("bits", 4),
                              attrs["block_size"]).dequantize()


def _rebuild_from_codes(graph: ir.Graph, node: ir.Node, scale: np.ndarray, stored: ir.Value,
                        zero: ir.Value | None) -> bool:
    """Replace ``MatMulNBits(latent, W)`` (no bias) by a product over the codes with diag(s) · W (module doc)."""
    found = _nbits_weight(node)
    if found is None or found.shape[0] != scale.shape[0] or len(node.inputs) > 5 and node.inputs[5] is not None:
        return False
    weight = scale[:, None] * found
    name = node.name or "matmulnbits"
    if stored.dtype == ir.DataType.UINT8 and zero is not None:
        column = (np.maximum(np.abs(weight).max(axis=0), np.finfo(np.float32).tiny) / 127).astype(np.float32)
        codes = np.clip(np.rint(weight / column), -127, 127).astype(np.int8)
        one = initializer(graph, f"{name}/codes_scale", np.asarray(1.0, np.float32))
        product = ir.Node("com.microsoft", "MatMulIntegerToFloat",
                          [stored, initializer(graph, f"{name}/latent_scaled_codes", codes), one,
                           initializer(graph, f"{name}/latent_scaled_column_scales", column), zero],
                          name=f"{name}/integer")
    else:
        product = ir.Node("", "MatMul", [node.inputs[0], initializer(graph, f"{name}/latent_scaled_weight", weight)],
                          name=f"{name}/float")
    product.outputs[0].dtype, product.outputs[0].shape = ir.DataType.FLOAT, node.outputs[0].shape
    replace_nodes_and_values(graph, node, [node], [product], [node.outputs[0]], [product.outputs[0]])
    return True


def _fold_into_matmul(graph: ir.Graph, node: ir.Node, scale: np.ndarray) -> bool:
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.shape[0] != scale.shape[0]:
        return False
    node.replace_input_with(1, initializer(graph, f"{node.name or 'matmul'}/latent_scaled_weight",
                                           (scale[:, None] * weight).astype(weight.dtype)))
    return True


def weighted_product(user: ir.Node, index: int) -> ir.Node | None:
    """The MatMul that reads the latent read by (``user``, ``index``) as its right operand through single-use
    Unsqueezes (``user`` itself, or the end of the Unsqueeze chain ``user`` starts), or None."""
    while user.op_type == "Unsqueeze" and user.domain in ("", "ai.onnx") and index == 0:
        uses = list(user.outputs[0].uses())
        if len(uses) != 1:
            return None
        user, index = uses[0]
    return user if user.op_type == "MatMul" and user.domain in ("", "ai.onnx") and index == 1 else None


def _scale_product(graph: ir.Graph, product: ir.Node, scale: ir.Value) -> None:
    """Every reader of ``product``'s output reads ``Mul(output, scale)`` (the latent channel is its last axis)."""
    out = product.outputs[0]
    readers = list(out.uses())
    scaled = add_node(graph, "Mul", [out, scale], f"{product.name or 'matmul'}/latent_scaled").outputs[0]
    scaled.dtype, scaled.shape = ir.DataType.FLOAT, out.shape  # float · float (the product may carry no type)
    for reader, index in readers:
        reader.replace_input_with(index, scaled)
    for position, graph_output in enumerate(graph.outputs):
        if graph_output is out:  # the scaled product takes over the output and its name
            name, out.name = out.name, f"{out.name}/unscaled"
            scaled.name = name
            graph.outputs[position] = scaled


class FoldLatentScalesPass(GraphPass):
    """requires: at least one latent dequantizer (:func:`latent_dequantizers`). ensures: none is left."""

    def requires(self, model: ir.Model) -> None:
        if not latent_dequantizers(model.graph):
            raise self.precondition("no DequantizeLinear of a coded latent cache output to fold")

    def ensures(self, model: ir.Model) -> None:
        left = latent_dequantizers(model.graph)
        if left:
            raise self.postcondition("a latent cache is still dequantized per step", left[0])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for dequantize in latent_dequantizers(graph):
            stored, scale_value = dequantize.inputs[0], dequantize.inputs[1]
            assert stored is not None and scale_value is not None
            scale = np.asarray(const_array(scale_value), dtype=np.float32)
            zeros = const_array(dequantize.inputs[2]) if len(dequantize.inputs) > 2 else None
            prefix = (dequantize.name or "latent").rsplit("/", 1)[0]
            zero = None
            if zeros is None or not np.any(zeros):
                codes = add_node(graph, "Cast", [stored], f"{prefix}/codes_float", {"to": ir.DataType.FLOAT})
            else:
                zero = initializer(graph, f"{prefix}/zero_point_scalar", np.asarray(np.ravel(zeros)[0]))
                one = initializer(graph, f"{prefix}/unit_scale", np.asarray(1.0, np.float32))
                codes = add_node(graph, "DequantizeLinear", [stored, one, zero], f"{prefix}/codes_float")
            codes_value = codes.outputs[0]
            codes_value.dtype, codes_value.shape = ir.DataType.FLOAT, stored.shape
            scaled: ir.Value | None = None
            for user, index in list(dequantize.outputs[0].uses()):
                user.replace_input_with(index, codes_value)
                if index == 0 and user.op_type == "MatMulNBits" and user.domain == "com.microsoft" \
                        and _rebuild_from_codes(graph, user, scale, stored, zero):
                    continue
                if index == 0 and user.op_type == "MatMul" and _fold_into_matmul(graph, user, scale):
                    continue
                product = weighted_product(user, index)
                if product is not None:
                    _scale_product(graph, product, scale_value)
                    continue
                if scaled is None:
                    scaled = add_node(graph, "Mul", [codes_value, scale_value], f"{prefix}/codes_scaled").outputs[0]
                    scaled.dtype, scaled.shape = ir.DataType.FLOAT, stored.shape
                user.replace_input_with(index, scaled)
            graph.remove(dequantize, safe=True)
        common.RemoveUnusedNodesPass()(model)  # the replaced weights and scales (initializers too)
        graph.sort()
        return ir.passes.PassResult(model, True)
