"""``integer_value_product``: the attention-weighted latent multiplied on the cached uint8 codes by integer GEMM.

Input: a graph after :mod:`fold_latent_scales` (and :mod:`latent_sink` for 4-bit caches). Per latent layer the
cache's codes are read through a float view ``codes = DequantizeLinear(stored, 1, z)`` [B, T, r] (``stored`` uint8:
``present.i.latent`` itself, or its unpacked 4-bit codes), and :mod:`fold_value`'s attention-weighted latent is
``MatMul(P, Unsqueeze…(codes))`` with ``P = Softmax(scores)`` [B, …, S, T] (rows on the last axis). That float view
is a copy of the whole cache at every decode step, and the product reads it again.

After, per such product, with ``x = P / rowmax(P)`` ∈ [0, 1] as rows [B, M, T] (M = the product of P's middle axes):

- ``coarse = QuantizeLinear(x − 1/510, 1/255, 0)``: x rounded down to the 1/255 grid (uint8);
- ``fine = QuantizeLinear(x − coarse/255, 1/65025, 0)``: the remainder, in [0, 1/255], on a 255× finer grid;
- ``both = MatMulIntegerToFloat(Concat(coarse, fine, axis=1), stored, 1, 1, 0, z)`` [B, 2M, r]: one integer product,
  one pass over the codes (the codes' float view and the float product go);
- ``(255 · both[:, :M] + both[:, M:]) · rowmax / 65025``, reshaped to P's leading axes + [r]: the product.

Error: each probability is carried to ``rowmax / 130050``, so ``|Δ product[m, j]| ≤ rowmax_m / 130050 ·
Σ_t |codes[t, j] − z|`` plus float rounding (``tests/test_integer_value_product.py`` pins that bound). A single
8-bit grid (one pass without the fine rows) was measured faster but cost +0.8 % wiki_eval perplexity on 2,048-token
windows (docs/decisions.md): diffuse rows put most probabilities under its step.
Products whose left operand is not a Softmax over the last axis (no non-negative rows) are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.passes._graph import add_node, const_array, initializer, typed
from qsvd_export.passes.contracts import GraphPass
from qsvd_export.passes.fold_latent_scales import weighted_product
from qsvd_export.passes.quantize_latent_cache import latent_codes_predicate

COARSE_STEP = 255  # the first grid: 1/255 of the row maximum
FINE_STEP = 255 * 255  # the remainder's grid: 1/65025


@dataclass(frozen=True)
class WeightedLatent:
    """``MatMul(P, Unsqueeze…(DequantizeLinear(stored, 1, zero)))`` with P a Softmax's output."""

    product: ir.Node
    probabilities: ir.Value
    stored: ir.Value
    zero: ir.Value


def _codes_view(node: ir.Node, is_latent_codes: Callable[[ir.Value | None], bool]) -> tuple[ir.Value, ir.Value] | None:
    """(stored, zero) when ``node`` is ``DequantizeLinear(stored, 1, z)`` of a latent cache's uint8 codes, per
    tensor, with a scalar constant zero point."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return None
    stored, scale, zero = node.inputs
    if stored is None or zero is None or stored.dtype != ir.DataType.UINT8 or not is_latent_codes(stored):
        return None
    scale_array, zero_array = const_array(scale), const_array(zero)
    if scale_array is None or scale_array.size != 1 or float(scale_array.ravel()[0]) != 1.0 \
            or zero_array is None or zero_array.size != 1:
        return None
    return stored, zero


def _batched_product(user: ir.Node, index: int) -> ir.Node | None:
    """fold_latent_scales' :func:`weighted_product` of the [B, T, r] codes, when its Unsqueezes only add axes
    between B and T (so the MatMul is batched over B and broadcast over the added axes), or None."""
    product = weighted_product(user, index)
    dims = ["batch", "length", "channels"]
    while product is not None and user is not product:
        axes = const_array(user.inputs[1]) if len(user.inputs) > 1 else None
        if axes is None:
            return None
        rank = len(dims) + axes.size
        for axis in sorted(int(a) % rank for a in axes.ravel()):
            dims.insert(axis, "one")
        if dims[0] != "batch" or dims[-2:] != ["length", "channels"]:
            return None
        user = next(iter(user.outputs[0].uses()))[0]  # single use: weighted_product checked it
    return product


def _softmax_rows(value: ir.Value | None, opset: int) -> bool:
    """``value`` is a Softmax over its last axis (opset ≥ 13 semantics: the default axis is -1)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or opset < 13:
        return False
    axis = node.attributes.get("axis")
    rank = len(value.shape) if value is not None and value.shape is not None else None
    return axis is None or axis.as_int() == -1 or rank is not None and axis.as_int() == rank - 1


def weighted_latents(graph: ir.Graph) -> list[WeightedLatent]:
    """Every attention-weighted latent product this pass rewrites (module doc)."""
    is_latent_codes = latent_codes_predicate(graph)
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
    found = []
    for node in graph:
        view = _codes_view(node, is_latent_codes)
        if view is None:
            continue
        for user, index in list(node.outputs[0].uses()):
            product = _batched_product(user, index)
            if product is not None and _softmax_rows(product.inputs[0], opset):
                found.append(WeightedLatent(product, product.inputs[0], *view))  # type: ignore[arg-type]
    return found


def _float(value: ir.Value) -> ir.Value:
    return typed(value, ir.DataType.FLOAT)


def _integer_product(graph: ir.Graph, found: WeightedLatent) -> None:
    """Replace ``found.product`` by the two-grid integer product of the module doc."""
    p = f"{found.product.name or 'weighted_latent'}/integer"

    def const(key: str, array: np.ndarray) -> ir.Value:
        return initializer(graph, f"{p}/{key}", array)

    def node(op: str, inputs: list[ir.Value | None], key: str, attributes: dict | None = None,
             domain: str = "", num_outputs: int = 1) -> ir.Node:
        return add_node(graph, op, inputs, f"{p}/{key}", attributes, num_outputs, domain)

    probabilities, stored = found.probabilities, found.stored
    length = node("Shape", [probabilities], "length", {"start": -1}).outputs[0]
    rows_shape = node("Concat", [const("leading", np.asarray([0, -1], np.int64)), length], "rows_shape",
                      {"axis": 0}).outputs[0]
    rows = _float(node("Reshape", [probabilities, rows_shape], "rows").outputs[0])
    row_max = _float(node("ReduceMax", [rows, const("last_axis", np.asarray([-1], np.int64))], "row_max",
                          {"keepdims": 1}).outputs[0])
    x = _float(node("Div", [rows, row_max], "normalized").outputs[0])
    coarse_scale = const("coarse_scale", np.asarray(1 / COARSE_STEP, np.float32))
    fine_scale = const("fine_scale", np.asarray(1 / FINE_STEP, np.float32))
    zero_point = const("zero_point", np.asarray(0, np.uint8))
    lowered = _float(node("Sub", [x, const("half_step", np.asarray(0.5 / COARSE_STEP, np.float32))],
                          "lowered").outputs[0])
    coarse = typed(node("QuantizeLinear", [lowered, coarse_scale, zero_point], "coarse").outputs[0],
                   ir.DataType.UINT8)
    rounded = _float(node("DequantizeLinear", [coarse, coarse_scale, zero_point], "coarse_value").outputs[0])
    remainder = _float(node("Sub", [x, rounded], "remainder").outputs[0])
    fine = typed(node("QuantizeLinear", [remainder, fine_scale, zero_point], "fine").outputs[0], ir.DataType.UINT8)
    both = typed(node("Concat", [coarse, fine], "both", {"axis": 1}).outputs[0], ir.DataType.UINT8)
    unit = const("unit", np.asarray(1.0, np.float32))
    product = _float(node("MatMulIntegerToFloat", [both, stored, unit, unit, zero_point, found.zero], "product",
                          domain="com.microsoft").outputs[0])
    halves = node("Split", [product], "halves", {"axis": 1, "num_outputs": 2}, num_outputs=2).outputs
    coarse_sum = _float(node("Mul", [_float(halves[0]), const("coarse_weight", np.asarray(COARSE_STEP, np.float32))],
                             "coarse_weighted").outputs[0])
    total = _float(node("Add", [coarse_sum, _float(halves[1])], "total").outputs[0])
    row_scale = _float(node("Mul", [row_max, fine_scale], "row_scale").outputs[0])
    scaled = _float(node("Mul", [total, row_scale], "scaled").outputs[0])
    leading = node("Shape", [probabilities], "leading_dims", {"end": -1}).outputs[0]
    rank = stored.shape[-1] if stored.shape is not None and len(stored.shape) == 3 else None
    channels = const("channels", np.asarray([rank], np.int64)) if isinstance(rank, int) \
        else node("Shape", [stored], "channels", {"start": -1}).outputs[0]
    out_shape = node("Concat", [leading, channels], "out_shape", {"axis": 0}).outputs[0]
    result = node("Reshape", [scaled, out_shape], "out")
    old, new = found.product.outputs[0], result.outputs[0]
    typed(new, ir.DataType.FLOAT, old.shape)
    output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(found.product, safe=True)
    if output:  # the graph output keeps its name
        name, old.name = old.name, f"{old.name}/float"
        new.name = name


class IntegerValueProductPass(GraphPass):
    """requires: at least one attention-weighted latent product (:func:`weighted_latents`). ensures: none is left."""

    def requires(self, model: ir.Model) -> None:
        if not weighted_latents(model.graph):
            raise self.precondition("no Softmax-weighted product over a uint8 latent cache's codes to rewrite")

    def ensures(self, model: ir.Model) -> None:
        left = weighted_latents(model.graph)
        if left:
            raise self.postcondition("an attention-weighted latent is still a float product", left[0].product)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for found in weighted_latents(graph):
            _integer_product(graph, found)
        common.RemoveUnusedNodesPass()(model)  # the Unsqueezes, and the float codes view if nothing else reads it
        graph.sort()
        return ir.passes.PassResult(model, True)
