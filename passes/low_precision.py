"""Rewrites every low-precision target needs before its activations leave fp32 (npu QDQ, gpu fp16).

Outputs are unchanged up to the mask value:
- RMSNorm (Pow→ReduceMean→Add→Sqrt→Reciprocal→Mul→Mul) → ``SimplifiedLayerNormalization``
  (onnxscript's ORT fusion). The TorchScript exporter (optimum) writes ``rsqrt`` as
  ``Div(1, Sqrt(...))``: that is made ``Reciprocal(Sqrt(...))`` first, and a mean of squares without
  the (default) ``noop_with_empty_axes`` attribute gets it spelled out, so its norms fuse too.
  The fused op accumulates mean(x²) in fp32 on every EP; decomposed, mean(x²) reaches ~1e6 on
  smollm2, past fp16's 65504 and erasing ordinary tokens in a single 16-bit range.
- Float "minus infinity" stand-ins (scalar constants with |v| >= 1e30, e.g. the dtype-min of an additive
  attention mask) → ±``mask_value``: in fp16 they would become -inf and ``0 · -inf`` = NaN in the
  mask arithmetic; in a 16-bit quantized range they would crush the scores. exp(-mask_value) is already
  0 in fp32 for any realistic score spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from qsvd_export.passes.contracts import GraphPass

MINUS_INFINITY_STANDIN = 1e30


@dataclass
class LegalizeReport:
    rms_norms_fused: int = 0
    mask_constants_clamped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rms_norms_fused": self.rms_norms_fused, "mask_constants_clamped": len(self.mask_constants_clamped)}


def _clamp_minus_infinity(value: ir.Value, mask_value: float) -> bool:
    tensor = value.const_value
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size != 1:
        return False
    array = tensor.numpy()
    scalar = float(array.reshape(-1)[0])
    if abs(scalar) < MINUS_INFINITY_STANDIN:
        return False
    value.const_value = ir.tensor(np.full(array.shape, np.copysign(mask_value, scalar), np.float32), name=value.name)
    return True


def _one_over_sqrt(op, one, root):  # type: ignore[no-untyped-def]
    return op.Div(one, op.Sqrt(root))


def _reciprocal_sqrt(op, one, root):  # type: ignore[no-untyped-def]
    return op.Reciprocal(op.Sqrt(root))


def _is_one(context, one, root, **_) -> bool:  # type: ignore[no-untyped-def]
    from onnxscript.rewriter import _ir_utils

    return _ir_utils.get_singleton_value(one) == 1.0


def reciprocal_rule() -> object:
    """``Div(1, Sqrt(x))`` → ``Reciprocal(Sqrt(x))`` (an onnxscript rewrite rule)."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRule(_one_over_sqrt, _reciprocal_sqrt, _is_one)


def _spell_out_mean_of_squares(model: ir.Model) -> None:
    """Give ``ReduceMean(Pow(x, 2))`` its default ``noop_with_empty_axes=0`` explicitly (the fusion's pattern
    matches attributes as written)."""
    for node in model.graph:
        source = node.inputs[0].producer() if node.op_type == "ReduceMean" and node.inputs else None
        if source is not None and source.op_type == "Pow" and "noop_with_empty_axes" not in node.attributes:
            node.attributes["noop_with_empty_axes"] = ir.AttrInt64("noop_with_empty_axes", 0)


def fuse_norms_and_clamp_masks(model: ir.Model, mask_value: float) -> LegalizeReport:
    """Fuse RMSNorm and clamp minus-infinity constants to ±``mask_value``, in place."""
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    pattern.RewriteRuleSet([reciprocal_rule()]).apply_to_model(model)
    _spell_out_mean_of_squares(model)
    report = LegalizeReport(rms_norms_fused=int(fuse_rms_normalization(model)))
    for value in model.graph.initializers.values():
        if _clamp_minus_infinity(value, mask_value):
            report.mask_constants_clamped.append(value.name or "")
    return report


class FuseNormsAndClampMasksPass(GraphPass):
    """:func:`fuse_norms_and_clamp_masks` as a pass (``self.report``). requires: a finite positive ``mask_value``.
    ensures: no minus-infinity stand-in constant is left."""

    def __init__(self, mask_value: float) -> None:
        super().__init__()
        self.mask_value = mask_value
        self.report = LegalizeReport()

    def requires(self, model: ir.Model) -> None:
        if not 0 < self.mask_value < MINUS_INFINITY_STANDIN:
            raise self.precondition(f"mask value {self.mask_value} (positive, below {MINUS_INFINITY_STANDIN:g})")

    def ensures(self, model: ir.Model) -> None:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and tensor.size == 1 and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) \
                    and abs(float(tensor.numpy().reshape(()))) >= MINUS_INFINITY_STANDIN:
                raise self.postcondition(f"constant {value.name} is still a minus-infinity stand-in")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = fuse_norms_and_clamp_masks(model, self.mask_value)
        return ir.passes.PassResult(model, True)
