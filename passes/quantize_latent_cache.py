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

``bits=4``: codes in [1, 15] around zero point 8 (±7 · s, saturated by ``Clip``), two per byte: with h = ⌈r/2⌉,
byte j of ``present.i.latent`` [batch, seq, h] holds channel j in its low nibble and channel j + h in its high
nibble (an odd r pads one zero code). The readers then read
``DequantizeLinear(Concat(BitwiseAnd(present, 15), BitShift(present, 4, RIGHT), axis=2)[..., :r], s, 8, axis=2)``:
unpacking is two elementwise kernels and a Concat, with no interleave.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, initializer, slice_axis, typed
from qsvd_export.passes.contracts import GraphPass

ZERO_POINT = 128  # uint8 codes: value = (code − 128) · scale[channel]
ZERO_POINT_4 = 8  # 4-bit codes in a nibble: value = (code − 8) · scale[channel], code in [1, 15]
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


def latent_codes_predicate(graph: ir.Graph) -> Callable[[ir.Value | None], bool]:
    """A test of whether a value is a coded latent cache: a ``present.i.latent`` graph output itself, or its
    unpacked 4-bit codes (:func:`unpacked_codes_source`)."""
    outputs = {id(v) for v in graph.outputs
               if LATENT_INPUT.match((v.name or "").replace("present.", "past_key_values.", 1))}
    return lambda value: value is not None and (id(value) in outputs or id(unpacked_codes_source(value)) in outputs)


def unpacked_codes_source(value: ir.Value) -> ir.Value | None:
    """The packed 4-bit cache output that ``value`` unpacks (``Concat(BitwiseAnd(p, 15), BitShift(p, 4), axis=2)``,
    optionally sliced to r channels; module doc), or None."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Slice" and producer.domain in ("", "ai.onnx"):
        value = producer.inputs[0]
        producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat" or producer.domain not in ("", "ai.onnx") \
            or len(producer.inputs) != 2:
        return None
    low, high = (v.producer() if v is not None else None for v in producer.inputs)
    if low is None or high is None or low.op_type != "BitwiseAnd" or high.op_type != "BitShift" \
            or low.inputs[0] is not high.inputs[0]:
        return None
    return low.inputs[0]


class QuantizeLatentCachePass(GraphPass):
    """``scales``: per latent cache input name its float32 scale vector [r] (every one must be in the graph).
    ``bits``: 8 (one code per byte, zero point 128) or 4 (two codes per byte, zero point 8; module doc).
    ``levels`` (8-bit only, probes): codes saturate at zero point ± levels (127: no saturation node)."""

    def __init__(self, scales: dict[str, np.ndarray], bits: int = 8, levels: int = 127) -> None:
        super().__init__()
        if bits not in (4, 8) or not 1 <= levels <= 127 or bits == 4 and levels != 127:
            raise ValueError(f"latent cache codes: bits 4 or 8 (levels only with 8), got bits={bits} levels={levels}")
        self.scales = scales
        self.bits = bits
        self.levels = levels

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
            prefix = f"qsvd/{name}/codes{self.bits}"
            zero_point = ZERO_POINT if self.bits == 8 else ZERO_POINT_4
            scale_value = initializer(graph, f"{prefix}/scale", np.asarray(scale, dtype=np.float32))
            zero = initializer(graph, f"{prefix}/zero_point", np.full(np.shape(scale), zero_point, dtype=np.uint8))
            new = concat.inputs[1]
            assert new is not None
            codes = _codes(add_node(graph, "QuantizeLinear", [new, scale_value, zero], f"{prefix}/quantize_new",
                                    {"axis": 2}), new.shape)
            limit = 7 if self.bits == 4 else self.levels
            if limit < 127:
                bounds = [initializer(graph, f"{prefix}/code_{end}", np.asarray(zero_point + sign * limit, np.uint8))
                          for end, sign in (("min", -1), ("max", 1))]
                codes = _codes(add_node(graph, "Clip", [codes, *bounds], f"{prefix}/saturate"), new.shape)
            if self.bits == 4:
                codes = _pack_nibbles(graph, codes, len(scale), prefix)
            concat.replace_input_with(1, codes)
            present = concat.outputs[0]
            readers = list(present.uses())
            stored = _unpack_nibbles(graph, present, len(scale), prefix) if self.bits == 4 else present
            values = add_node(graph, "DequantizeLinear", [stored, scale_value, zero], f"{prefix}/dequantize",
                              {"axis": 2}).outputs[0]
            values.dtype, values.shape = ir.DataType.FLOAT, stored.shape
            for user, index in readers:
                user.replace_input_with(index, values)
            width = (len(scale) + 1) // 2 if self.bits == 4 else len(scale)
            for cache in (past, present):
                cache.type = ir.TensorType(ir.DataType.UINT8)
                if self.bits == 4 and cache.shape is not None:
                    cache.shape = ir.Shape([*list(cache.shape)[:-1], width])
        graph.sort()
        return ir.passes.PassResult(model, bool(self.scales))


def _codes(node: ir.Node, shape: ir.Shape | None = None) -> ir.Value:
    """The node's output typed as uint8 codes."""
    return typed(node.outputs[0], ir.DataType.UINT8, shape)


def _channels(graph: ir.Graph, x: ir.Value, start: int, end: int, name: str) -> ir.Value:
    """uint8 ``x[..., start:end]`` on the channel axis (2)."""
    return typed(slice_axis(graph, x, start, end, 2, name), ir.DataType.UINT8)


def _pack_nibbles(graph: ir.Graph, codes: ir.Value, width: int, prefix: str) -> ir.Value:
    """[batch, seq, r] codes in [0, 15] → [batch, seq, ⌈r/2⌉] bytes: channel j low nibble, j + ⌈r/2⌉ high."""
    half = (width + 1) // 2
    if width % 2:
        pads = initializer(graph, f"{prefix}/pad_odd", np.asarray([0, 0, 0, 0, 0, 1], np.int64))
        fill = initializer(graph, f"{prefix}/pad_code", np.asarray(ZERO_POINT_4, np.uint8))
        codes = _codes(add_node(graph, "Pad", [codes, pads, fill], f"{prefix}/pad"))
    low = _channels(graph, codes, 0, half, f"{prefix}/low_channels")
    high = _channels(graph, codes, half, 2 * half, f"{prefix}/high_channels")
    four = initializer(graph, f"{prefix}/four", np.asarray(4, np.uint8))
    shifted = _codes(add_node(graph, "BitShift", [high, four], f"{prefix}/shift_high", {"direction": "LEFT"}))
    return _codes(add_node(graph, "BitwiseOr", [low, shifted], f"{prefix}/pack"))


def _unpack_nibbles(graph: ir.Graph, packed: ir.Value, width: int, prefix: str) -> ir.Value:
    """Inverse of :func:`_pack_nibbles`: [batch, seq, ⌈r/2⌉] bytes → [batch, seq, r] codes."""
    mask = initializer(graph, f"{prefix}/low_mask", np.asarray(15, np.uint8))
    four = initializer(graph, f"{prefix}/unpack_four", np.asarray(4, np.uint8))
    low = _codes(add_node(graph, "BitwiseAnd", [packed, mask], f"{prefix}/unpack_low"))
    high = _codes(add_node(graph, "BitShift", [packed, four], f"{prefix}/unpack_high", {"direction": "RIGHT"}))
    codes = _codes(add_node(graph, "Concat", [low, high], f"{prefix}/unpack", {"axis": 2}))
    return _channels(graph, codes, 0, width, f"{prefix}/unpack_odd") if width % 2 else codes
