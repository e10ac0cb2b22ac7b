"""Target policies: what the graph becomes for each execution provider, and the checks before writing.

- ``cpu``: weight-only integer MatMuls (``com.microsoft.MatMulNBits``, MLAS kernels) and an 8-bit
  embedding table (``com.microsoft.GatherBlockQuantized``, :mod:`qsvd_export.passes.quantize_embedding`). ``a8`` presets use
  accuracy level 4 (activations quantized to int8 per block inside the kernel, integer dot products);
  ``a16`` presets keep float activations (accuracy level 1). Default ``w8a8`` (near-lossless); ``export``
  defaults to ``w4a8`` with activation-aware smoothing when it has a llama-family torch model
  (smollm2: 1.14× perplexity instead of 1.24× for plain w4a8). Checked on the graph ONNX Runtime actually
  runs: the session's optimized graph must hold no float MatMul with a constant weight.
  Attention of plain causal models (llama, qwen2/qwen3 without a sliding window) with a dense cache runs
  as ``com.microsoft.GroupQueryAttention`` (:mod:`qsvd_export.passes.group_query_attention`).
- ``gpu``: CUDA EP: the same weight-only MatMulNBits graph, then fp16 activations, weights and cache
  (:mod:`qsvd_export.passes.float16`; logits stay fp32). Default ``w4a16``; ``fp`` = fp16 without integer
  weights.
- ``npu``: QNN HTP: static prefill/decode graphs with QDQ (uint16/uint8 activations, int8 weights per
  channel or int4 weights in LPBQ blocks, :mod:`qsvd_export.block_weights`), built on files after the
  bundle is written (:mod:`qsvd_export.npu`); default ``w8a16``.
- ``w4a4`` is refused everywhere: no target runs 4-bit activations.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qsvd_export.errors import UsageError
from qsvd_export.passes.quantize_weights import QuantizeWeightsPass, WeightQuantReport
from qsvd_export.quantize import Bits, parse_bits


@dataclass(frozen=True)
class TargetPolicy:
    name: str
    default_bits: str
    allowed_bits: tuple[str, ...]
    block_size: int = 32
    smoothed_default: str | None = None  # export's default when activation-aware smoothing is possible
    float16: bool = False  # convert activations, float weights and the cache to fp16 after quantizing
    quantize_embedding: bool = False  # an fp32 table read only by Gather → 8-bit GatherBlockQuantized
    fuse_attention: bool = False  # dense-cache attention → com.microsoft.GroupQueryAttention (plain causal models)

    def bits(self, requested: str | None) -> Bits:
        name = requested or self.default_bits
        bits = parse_bits(name)
        if name == "w4a4":
            raise UsageError(f"--bits w4a4 is not available for target {self.name}: no target runs 4-bit activations "
                             "(QNN HTP: 8/16-bit, MLAS: int8, CUDA EP: fp16); w4a4 serves the torch stage's β search "
                             "(compress --bits w4a4 without --target)")
        if name not in self.allowed_bits:
            raise UsageError(f"--bits {name} is not available for target {self.name} "
                             f"(choose from {', '.join(self.allowed_bits)})")
        return bits

    def quantize(self, model: ir.Model, bits: Bits, plain_causal: bool = False,
                 latent: dict[int, Any] | None = None) -> dict[str, Any]:
        """Rewrite ``model`` in place for ``bits`` (then fp16 where the policy says); returns what was done
        (for report.json). ``plain_causal``: the model's attention mask is causal + padding only (no sliding
        window), so the policy may fuse attention into GroupQueryAttention; ``latent``: per fusable block,
        the :class:`~qsvd_export.latent_layout.LatentLayer` its fused attention reads (latent or int8 cache)."""
        fusion = None
        if latent and not (self.fuse_attention and plain_causal):
            raise UsageError(f"a latent or quantized KV cache needs fused attention: target {self.name} "
                             "fuses the attention of plain causal models (llama, qwen2/qwen3) only")
        if self.fuse_attention and plain_causal:  # first: attention is found through its float projections
            from qsvd_export.passes.group_query_attention import fuse_group_query_attention

            fusion = fuse_group_query_attention(model, latent).as_dict()
            if fusion["group_query_attention"]:
                fusion["attention_mask"] = "right padding only (GroupQueryAttention reads each row's length)"
        report = self._quantize_weights(model, bits)
        if fusion is not None:
            report["attention"] = fusion
        if self.float16:
            from qsvd_export.passes.float16 import to_float16

            report["float16"] = to_float16(model).as_dict()
        return report

    def _quantize_weights(self, model: ir.Model, bits: Bits) -> dict[str, Any]:
        """Weight-only MatMulNBits. With 4-bit weights the MatMuls that produce graph outputs (the lm_head)
        stay at 8 bits: measured on smollm2 (8 windows), int4 everywhere costs 1.33× perplexity, int8
        lm_head brings it to 1.22×."""
        if bits.weights is None:
            return {"quantized_matmuls": 0}
        accuracy_level = 4 if bits.activations == 8 else 1
        report: dict[str, Any] = {"block_size": self.block_size, "accuracy_level": accuracy_level,
                                  "weights": "symmetric round-to-nearest, signed block scale"}
        done = WeightQuantReport()
        if bits.weights < 8:
            outputs = {v.name for v in model.graph.outputs}
            heads = frozenset(n.name for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name in outputs)
            others = frozenset(n.name for n in model.graph if n.op_type == "MatMul") - heads
            QuantizeWeightsPass(8, self.block_size, accuracy_level, exclude=others, symmetric=True, report=done)(model)
            report["output_matmuls_at_8_bits"] = list(done.quantized)
        QuantizeWeightsPass(bits.weights, self.block_size, accuracy_level, symmetric=True, report=done)(model)
        report.update(done.as_dict())
        if self.quantize_embedding:  # after the lm_head took its own copy of a tied table
            from qsvd_export.passes.quantize_embedding import QuantizeEmbeddingPass

            embedding = QuantizeEmbeddingPass(self.block_size)
            embedding(model)
            report.update(embedding.report.as_dict())
        return report


POLICIES = {
    "cpu": TargetPolicy("cpu", default_bits="w8a8", allowed_bits=("fp", "w8a16", "w8a8", "w4a16", "w4a8"),
                        smoothed_default="w4a8", quantize_embedding=True, fuse_attention=True),
    "gpu": TargetPolicy("gpu", default_bits="w4a16", allowed_bits=("fp", "w8a16", "w4a16"), float16=True),
    "npu": TargetPolicy("npu", default_bits="w8a16", allowed_bits=("w8a16", "w8a8", "w4a16", "w4a8")),
}


def policy_for(target: str) -> TargetPolicy:
    if target not in POLICIES:
        raise UsageError(f"unknown target '{target}' (choose from cpu, gpu, npu)")
    return POLICIES[target]


def optimized_op_counts(graph_path: Path) -> dict[str, Any]:
    """Op types of the graph ONNX Runtime's CPU EP runs after its own optimizations (all levels)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(graph_path), sess_options=so, providers=["CPUExecutionProvider"])
        proto = onnx.load(so.optimized_model_filepath, load_external_data=False)
    constants = {i.name for i in proto.graph.initializer}
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    float_weight_matmuls = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")
                            and len(n.input) > 1 and n.input[1] in constants]
    return {"MatMulNBits": counts.get("MatMulNBits", 0), "float_matmuls_with_constant_weight": len(float_weight_matmuls),
            "examples": float_weight_matmuls[:5]}


PLAIN_CAUSAL_TYPES = ("llama", "qwen2", "qwen3")


def plain_causal(model_type: str, config: Any = None) -> bool:
    """Whether a model's attention mask is causal + padding only (GroupQueryAttention can take it over)."""
    return model_type in PLAIN_CAUSAL_TYPES and not getattr(config, "use_sliding_window", False)
