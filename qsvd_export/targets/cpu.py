"""``cpu``: weight-only integer MatMuls (``com.microsoft.MatMulNBits``, MLAS kernels) and an 8-bit embedding table
(``com.microsoft.GatherBlockQuantized``, :mod:`qsvd_export.passes.quantize_embedding`).

``a8`` presets use accuracy level 4 (activations quantized to int8 per block inside the kernel, integer dot
products); ``a16`` presets keep float activations (accuracy level 1). Default ``w8a8`` (near-lossless);
``export`` defaults to ``w4a8`` with activation-aware smoothing when it has a llama-family torch model
(smollm2: 1.14× perplexity instead of 1.24× for plain w4a8). Checked on the graph ONNX Runtime actually runs:
the session's optimized graph must hold no float MatMul with a constant weight. Attention of plain causal
models (llama, qwen2/qwen3 without a sliding window) runs as ``com.microsoft.GroupQueryAttention``
(:mod:`qsvd_export.passes.group_query_attention`), with a float, int8 or int4 cache or an absorbed latent.
"""

from __future__ import annotations

from qsvd_export.targets.policy import TargetPolicy

CPU = TargetPolicy("cpu", default_bits="w8a8", allowed_bits=("fp", "w8a16", "w8a8", "w4a16", "w4a8"),
                   smoothed_default="w4a8", quantize_embedding=True, fuse_attention=True,
                   description="onnxruntime CPU EP (MatMulNBits, fused GroupQueryAttention)")
