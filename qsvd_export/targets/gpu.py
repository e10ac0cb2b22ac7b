"""``gpu``: the CUDA EP. The same weight-only MatMulNBits graph as ``cpu``, then fp16 activations, weights and
cache (:mod:`qsvd_export.passes.float16`; logits stay fp32). Default ``w4a16``; ``fp`` = fp16 without integer
weights."""

from __future__ import annotations

from qsvd_export.targets.policy import TargetPolicy

GPU = TargetPolicy("gpu", default_bits="w4a16", allowed_bits=("fp", "w8a16", "w4a16"), float16=True,
                   description="onnxruntime CUDA EP (fp16, MatMulNBits)")
