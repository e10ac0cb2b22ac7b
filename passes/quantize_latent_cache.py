"""``quantize_latent_cache``: a latent cache crosses the graph boundary as 8-bit codes with static per-channel scales.

Before (layer i, :mod:`latent_kv`): ``present.i.latent = Concat(past_key_values.i.latent, latent_new, axis=1)``,
both float [batch, seq, r], and the rebuilt K/V read the float ``present``.

After: ``past_key_values.i.latent`` and ``present.i.latent`` are uint8 [batch, seq, r];
``present.i.latent = Concat(past, QuantizeLinear(latent_new, s, 128, axis=2), axis=1)`` and every former reader
of the float present reads ``DequantizeLinear(present, s, 128, axis=2)``. ``s`` [r] is the layer's static
symmetric scale per latent channel (value = (code − 128) · s[channel], codes in [1, 255] up to saturation).
Unsigned codes with the zero point at the midpoint, not int8: ONNX Runtime's integer GEMM has its fast path for
uint8 × int8 (:mod:`fold_latent_scales` rebuilds keys with it; int8 × int8 measured 2.4 ms against 0.11 ms for a
2,048 × 192 · 192 × 192 product on 2 cores). The attention of the new tokens sees the same dequantized values in
prefill and decode, so a decode step equals a prefill of the whole sequence up to float rounding. Dense cache
tensors are left as they are.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, initializer
from qsvd_export.passes.contracts import GraphPass

ZERO_POINT = 128  # uint8 codes: value = (code − 128) · scale[channel]
LATENT_INPUT = re.compile(r"^past_key_values\.(\d+)\.latent$")


def latent_cache_concat(graph: ir.Graph, past: ir.Value) -> ir.Node | None:
    """The node writing ``present.i.latent`` for the latent cache input ``past`` when it is the
    ``Concat(past, new, axis=1)`` of :mod:`latent_kv` (None otherwise)."""
    index = LATENT_INPUT.match(past.name or "")
    present = next((v for v in graph.outputs if index and v.name == f"present.{index.group(1)}.latent"), None)
    node = present.producer() if present is not None else None
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    axis = node.attributes.get("axis")
    if node.inputs[0] is not past or axis is None or axis.as_int() not in (1, -2):
        return None
    return node


class QuantizeLatentCachePass(GraphPass):
    """``scales``: per latent cache input name its float32 scale vector [r] (every one must be in the graph)."""

    def __init__(self, scales: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.scales = scales

    def requires(self, model: ir.Model) -> None:
        inputs = {v.name: v for v in model.graph.inputs}
        for name, scale in self.scales.items():
            past = inputs.get(name)
            if past is None or LATENT_INPUT.match(name) is None:
                raise self.precondition(f"no latent cache input {name!r}")
            if past.dtype != ir.DataType.FLOAT:
                raise self.precondition(f"{name} is {past.dtype}, not a float latent cache")
            if latent_cache_concat(model.graph, past) is None:
                raise self.precondition(f"{name} is not appended to by Concat(past, new, axis=1)")
            width = past.shape[-1] if past.shape is not None else None
            if np.shape(scale) != (width,) or not np.all(np.isfinite(scale)) or np.any(np.asarray(scale) <= 0):
                raise self.precondition(f"{name}: scales must be {width} positive finite values, "
                                        f"got shape {np.shape(scale)}")

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name: v for v in model.graph.outputs}
        for name in self.scales:
            present = outputs.get(name.replace("past_key_values.", "present.", 1))
            if inputs[name].dtype != ir.DataType.UINT8 or present is None or present.dtype != ir.DataType.UINT8:
                raise self.postcondition(f"{name} does not cross the graph boundary as uint8 codes")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        for name, scale in sorted(self.scales.items()):
            past = inputs[name]
            concat = latent_cache_concat(graph, past)
            assert concat is not None  # requires()
            prefix = f"qsvd/{name}/codes8"
            scale_value = initializer(graph, f"{prefix}/scale", np.asarray(scale, dtype=np.float32))
            zero = initializer(graph, f"{prefix}/zero_point", np.full(np.shape(scale), ZERO_POINT, dtype=np.uint8))
            new = concat.inputs[1]
            assert new is not None
            codes = add_node(graph, "QuantizeLinear", [new, scale_value, zero], f"{prefix}/quantize_new",
                             {"axis": 2}).outputs[0]
            codes.dtype, codes.shape = ir.DataType.UINT8, new.shape
            concat.replace_input_with(1, codes)
            present = concat.outputs[0]
            readers = list(present.uses())
            values = add_node(graph, "DequantizeLinear", [present, scale_value, zero], f"{prefix}/dequantize",
                              {"axis": 2}).outputs[0]
            values.dtype, values.shape = ir.DataType.FLOAT, present.shape
            for user, index in readers:
                user.replace_input_with(index, values)
            past.type = ir.TensorType(ir.DataType.UINT8)
            present.type = ir.TensorType(ir.DataType.UINT8)
        graph.sort()
        return ir.passes.PassResult(model, bool(self.scales))
