"""``latent_sink``: the first cached token's latent kept exact beside a 4-bit latent cache.

The first token of a sequence is an attention sink: most heads put much of their weight on it, and its latent is
small, so 4-bit codes with per-channel scales fitted to the other tokens carry it with ~10–40% relative error. On
smollm2 kv=0.5 (dev split, fp32 weights) that one token is two thirds of the 4-bit cache's loss: 26.744 with it
coded, 25.237 with it exact, 24.422 for the float latent (``docs/decisions.md``). IntactKV (Liu et al., 2024) keeps
such pivot tokens lossless for the same reason.

Input: a graph after :mod:`quantize_latent_cache` (``bits=4``) and :mod:`fold_latent_scales`: per layer i the new
tokens' float latent ``new`` [batch, seq, r] is coded into ``present.i.latent``, whose unpacked codes ``stored``
[batch, total, r] are read by ``MatMulIntegerToFloat(stored, W_q, 1, w, z)`` (the key rebuild, [batch, total, N])
and by a float view ``codes = stored − z``.

After, per layer:

- a float cache pair ``past_key_values.i.latent_sink`` [batch, past_sink, r] → ``present.i.latent_sink`` =
  ``Concat(past_sink, new, axis=1)[:, :1]``: the first token's exact latent (past_sink is 0 before the first call
  and 1 after; a fixed r · 4 bytes per layer, not per token);
- the key rebuild's row 0 is ``(sink / s) · Cast(W_q) · w`` (``ScatterElements`` on axis 1), so the sink's key is
  exact (its rotary angle is 0 at position 0);
- the attention-weighted latent ``MatMul(P, Unsqueeze…(codes))`` gets ``P[..., :1] · (sink / s − codes[:, :1])``
  added (a rank-1 correction, no pass over the cache); any other reader of ``codes`` reads it with row 0 replaced.

Row 0's 4-bit codes stay in the cache and are never read unchanged. Rows are per batch element: row 0 is the
first slot of the cache, i.e. position 0 for right-padded or unpadded batches.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qsvd_export.passes._graph import add_node, const_array, initializer, slice_axis, typed
from qsvd_export.passes.contracts import GraphPass
from qsvd_export.passes.quantize_latent_cache import LATENT_INPUT, latent_cache_concat, unpacked_codes_source

SINK_SUFFIX = "_sink"


def sink_name(latent_name: str) -> str:
    """``past_key_values.i.latent`` → ``past_key_values.i.latent_sink`` (``present.`` names alike)."""
    return latent_name + SINK_SUFFIX


def _coded_cache(graph: ir.Graph, past: ir.Value) -> tuple[ir.Value, ir.Value, np.ndarray] | None:
    """(the new tokens' float latent, the unpacked codes, the per-channel scale) of a 4-bit latent cache input."""
    concat = latent_cache_concat(graph, past)
    if concat is None or concat.inputs[1] is None:
        return None
    node = concat.inputs[1].producer()
    while node is not None and node.op_type in ("BitwiseOr", "BitShift", "Slice", "Pad", "Clip"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "QuantizeLinear" or node.inputs[0] is None:
        return None
    scale = const_array(node.inputs[1])
    present = concat.outputs[0]
    stored = [v for user, _ in present.uses() if user.op_type == "BitwiseAnd"
              for v in _unpacked_readers(user.outputs[0]) if unpacked_codes_source(v) is present]
    if scale is None or len(stored) != 1:
        return None
    return node.inputs[0], stored[0], np.asarray(scale, np.float32)


def _unpacked_readers(low: ir.Value) -> list[ir.Value]:
    """The unpack Concat's output (or its Slice to r channels) reached from the low-nibble value."""
    found = []
    for user, _ in low.uses():
        if user.op_type == "Concat":
            out = user.outputs[0]
            slices = [u.outputs[0] for u, _ in out.uses() if u.op_type == "Slice"]
            found.extend(slices if slices and all(u.op_type == "Slice" for u, _ in out.uses()) else [out])
    return found


def _typed(value: ir.Value, shape: ir.Shape | None = None) -> ir.Value:
    return typed(value, ir.DataType.FLOAT, shape)


def _row_zero(graph: ir.Graph, update: ir.Value, prefix: str) -> ir.Value:
    """int64 zeros shaped like ``update`` (the ScatterElements indices of row 0 on axis 1)."""
    shape = add_node(graph, "Shape", [update], f"{prefix}/update_shape").outputs[0]
    zeros = add_node(graph, "ConstantOfShape", [shape], f"{prefix}/row_zero",
                     {"value": ir.tensor(np.zeros(1, np.int64))}).outputs[0]
    zeros.dtype = ir.DataType.INT64
    return zeros


def _replace_uses(value: ir.Value, replacement: ir.Value, keep: ir.Node) -> None:
    for user, index in list(value.uses()):
        if user is not keep:
            user.replace_input_with(index, replacement)


class KeepLatentSinkPass(GraphPass):
    """``names``: the 4-bit latent cache inputs (``past_key_values.i.latent``) whose first token to keep exact."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = sorted(names)

    def requires(self, model: ir.Model) -> None:
        inputs = {v.name: v for v in model.graph.inputs}
        for name in self.names:
            past = inputs.get(name)
            if past is None or LATENT_INPUT.match(name) is None:
                raise self.precondition(f"no latent cache input {name!r}")
            if past.dtype != ir.DataType.UINT8 or _coded_cache(model.graph, past) is None:
                raise self.precondition(f"{name} is not a 4-bit coded latent cache (quantize_latent_cache bits=4)")
            if sink_name(name) in inputs:
                raise self.precondition(f"{name} already has a sink input")

    def ensures(self, model: ir.Model) -> None:
        inputs = {v.name for v in model.graph.inputs}
        outputs = {v.name for v in model.graph.outputs}
        for name in self.names:
            present = name.replace("past_key_values.", "present.", 1)
            if sink_name(name) not in inputs or sink_name(present) not in outputs:
                raise self.postcondition(f"{name} has no sink cache pair")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for name in self.names:
            past = next(v for v in graph.inputs if v.name == name)
            found = _coded_cache(graph, past)
            assert found is not None  # requires()
            new, stored, scale = found
            prefix = f"qsvd/{name}/sink"
            width = int(scale.shape[0])
            batch = past.shape[0] if past.shape is not None else "batch_size"
            past_sink = _typed(ir.Value(name=sink_name(name)), ir.Shape([batch, "past_sink_length", width]))
            graph.inputs.insert(graph.inputs.index(past) + 1, past_sink)
            joined = _typed(add_node(graph, "Concat", [past_sink, new], f"{prefix}/join", {"axis": 1}).outputs[0])
            sink = _typed(slice_axis(graph, joined, 0, 1, 1, f"{prefix}/first"), ir.Shape([batch, 1, width]))
            present_latent = name.replace("past_key_values.", "present.", 1)
            present_sink = _typed(add_node(graph, "Identity", [sink], sink_name(present_latent)).outputs[0], sink.shape)
            latent_output = next(i for i, v in enumerate(graph.outputs) if v.name == present_latent)
            graph.outputs.insert(latent_output + 1, present_sink)
            scale_value = initializer(graph, f"{prefix}/scale", scale)
            sink_codes = _typed(add_node(graph, "Div", [sink, scale_value], f"{prefix}/codes").outputs[0])
            for user, _ in list(stored.uses()):
                if user.op_type == "MatMulIntegerToFloat" and user.domain == "com.microsoft":
                    self._exact_key_row(graph, user, sink_codes, f"{prefix}/{user.name}")
                elif user.op_type == "DequantizeLinear":
                    self._exact_latent_row(graph, user.outputs[0], sink_codes, f"{prefix}/{user.name}")
        graph.sort()
        return ir.passes.PassResult(model, bool(self.names))

    @staticmethod
    def _exact_key_row(graph: ir.Graph, rebuild: ir.Node, sink_codes: ir.Value, prefix: str) -> None:
        """Row 0 of ``MatMulIntegerToFloat(codes, W_q, 1, w, z)`` becomes ``sink_codes · Cast(W_q) · w``."""
        weight = add_node(graph, "Cast", [rebuild.inputs[1]], f"{prefix}/weight", {"to": ir.DataType.FLOAT})
        _typed(weight.outputs[0])
        row = _typed(add_node(graph, "MatMul", [sink_codes, weight.outputs[0]], f"{prefix}/row").outputs[0])
        row = _typed(add_node(graph, "Mul", [row, rebuild.inputs[3]], f"{prefix}/row_scaled").outputs[0])
        keys = rebuild.outputs[0]
        fixed = add_node(graph, "ScatterElements", [keys, _row_zero(graph, row, prefix), row], f"{prefix}/exact_row",
                         {"axis": 1})
        _typed(fixed.outputs[0], keys.shape)
        _replace_uses(keys, fixed.outputs[0], fixed)

    @staticmethod
    def _exact_latent_row(graph: ir.Graph, codes: ir.Value, sink_codes: ir.Value, prefix: str) -> None:
        """Readers of the float codes view see row 0 as ``sink_codes``: the weighted product by a rank-1
        correction, any other reader through ``ScatterElements``."""
        from qsvd_export.passes.fold_latent_scales import weighted_product

        readers = list(codes.uses())
        first = _typed(slice_axis(graph, codes, 0, 1, 1, f"{prefix}/coded_first"))
        delta = _typed(add_node(graph, "Sub", [sink_codes, first], f"{prefix}/delta").outputs[0])
        patched: ir.Value | None = None
        for user, index in readers:
            product = weighted_product(user, index)
            if product is not None and product.inputs[0] is not None:
                node, value = user, delta
                while node is not product:  # the same Unsqueezes on the delta
                    value = _typed(add_node(graph, "Unsqueeze", [value, node.inputs[1]],
                                            f"{prefix}/{node.name}/delta").outputs[0])
                    node = next(iter(node.outputs[0].uses()))[0]
                first_weight = _typed(slice_axis(graph, product.inputs[0], 0, 1, -1,
                                                 f"{prefix}/{product.name}/sink_weight"))
                correction = _typed(add_node(graph, "MatMul", [first_weight, value],
                                             f"{prefix}/{product.name}/correction").outputs[0])
                out = product.outputs[0]
                total = add_node(graph, "Add", [out, correction], f"{prefix}/{product.name}/corrected")
                _typed(total.outputs[0], out.shape)
                _replace_uses(out, total.outputs[0], total)
                continue
            if patched is None:
                patched = _typed(add_node(graph, "ScatterElements", [codes, _row_zero(graph, sink_codes, prefix),
                                                                     sink_codes], f"{prefix}/exact_row",
                                          {"axis": 1}).outputs[0], codes.shape)
            user.replace_input_with(index, patched)
