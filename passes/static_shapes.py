"""``static_shapes``: a dynamic decoder graph (our cache I/O contract) → one fixed-shape variant.

NPU compilers need every dimension known. A static decoder graph has batch 1, ``seq`` new tokens and a
cache window of ``context`` slots in total:

  inputs  ``input_ids`` / ``position_ids`` [1, seq], ``attention_mask`` [1, context],
          ``past_key_values.{i}.key|value`` [1, kv_heads, context - seq, head_dim]
          (latent layers: ``past_key_values.{i}.latent`` [1, context - seq, r])
  outputs ``logits`` [1, seq, vocab], ``present.*`` with ``context`` slots on the sequence axis.

The cache is right-aligned: the newest token sits in the last slot, unused slots are zero-filled and
masked out by ``attention_mask`` (0). Before a call with ``s`` new tokens, the runner passes the last
``context - s`` slots of the previous ``present`` as ``past``. Shape arithmetic (Shape/Range/causal
mask) folds to constants once the dims are fixed.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from qsvd_export.errors import UnsupportedModelError
from qsvd_export.passes.contracts import GraphPass

_CACHE = re.compile(r"^past_key_values\.(\d+)\.(key|value|latent)$")
_TOKEN_INPUTS = ("input_ids", "position_ids")


_SHAPE_VECTOR = 8  # ConstantOfShape outputs of at most this many elements are shape arithmetic


def _fold_shape_vectors(node: ir.Node) -> bool | None:
    """Fold a ``ConstantOfShape`` that makes a short 1-D vector (onnxscript keeps every ConstantOfShape by
    default). The TorchScript exporter spells ``expand(-1, …)`` as ``Where(Equal(shape, -1),
    ConstantOfShape(...), shape)``; left unfolded, HF's rotary ``inv_freq`` Expand keeps a symbolic batch dim
    and its cos/sin cannot be tabulated. ``None`` leaves every other node to the default rules."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    if shape is None:
        return None
    dims = shape.numpy().reshape(-1)
    return True if dims.size == 1 and 0 <= int(dims[0]) <= _SHAPE_VECTOR else None


def specialize_decoder(model: ir.Model, seq: int, context: int) -> None:
    """Fix ``model``'s input dims to (batch 1, ``seq`` new tokens, ``context`` slots) and fold, in place."""
    import onnxscript

    if not 1 <= seq < context:
        raise UnsupportedModelError(f"static shapes need 1 <= sequence ({seq}) < context ({context})")
    names = {v.name for v in model.graph.inputs}
    if "input_ids" not in names or "attention_mask" not in names:
        raise UnsupportedModelError("static shapes need a decoder graph with input_ids and attention_mask inputs")
    for value in model.graph.inputs:
        dims = list(value.shape or [])
        if value.name in _TOKEN_INPUTS:
            value.shape = ir.Shape([1, seq])
        elif value.name == "attention_mask":
            value.shape = ir.Shape([1, context])
        elif (match := _CACHE.match(value.name or "")) is not None:
            axis = 1 if match.group(2) == "latent" else 2
            fixed = [1 if i == 0 else context - seq if i == axis else d for i, d in enumerate(dims)]
            if any(not isinstance(d, int) for d in fixed):
                raise UnsupportedModelError(f"cache input {value.name} has a dynamic dim besides batch and past")
            value.shape = ir.Shape(fixed)
        else:
            raise UnsupportedModelError(f"static shapes: unexpected graph input {value.name}")
    graph_inputs = set(model.graph.inputs)
    for node in model.graph:
        for output in node.outputs:
            if output not in graph_inputs:
                output.shape = None  # stale symbolic shapes would block folding
    for value in model.graph.outputs:
        value.shape = None
    onnxscript.optimizer.optimize_ir(model, should_fold=_fold_shape_vectors)
    dynamic = [v.name for v in model.graph.outputs if v.shape is None or not v.shape.is_static()]
    if dynamic:
        raise UnsupportedModelError(f"static shapes: outputs stay dynamic after folding: {', '.join(dynamic[:3])}")


class SpecializeDecoderPass(GraphPass):
    """:func:`specialize_decoder` as a pass. requires: 1 <= ``seq`` < ``context`` and a decoder graph (input_ids,
    attention_mask). ensures: every graph input has static dims."""

    def __init__(self, seq: int, context: int) -> None:
        super().__init__()
        self.seq, self.context = seq, context

    def requires(self, model: ir.Model) -> None:
        if not 1 <= self.seq < self.context:
            raise self.precondition(f"static shapes need 1 <= sequence ({self.seq}) < context ({self.context})")
        names = {v.name for v in model.graph.inputs}
        if "input_ids" not in names or "attention_mask" not in names:
            raise self.precondition("a decoder graph with input_ids and attention_mask inputs")

    def ensures(self, model: ir.Model) -> None:
        for value in model.graph.inputs:
            if value.shape is None or not value.shape.is_static():
                raise self.postcondition(f"input {value.name} keeps a dynamic shape {value.shape}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        specialize_decoder(model, self.seq, self.context)
        return ir.passes.PassResult(model, True)
