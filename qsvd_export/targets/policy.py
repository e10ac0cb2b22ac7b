"""The Target interface: what a bundle's graph becomes for one execution provider, as data plus three hooks.

A :class:`TargetPolicy` holds the presets (``default_bits``, ``allowed_bits``, the export's smoothed
default) and the graph-stage switches (GQA fusion, 8-bit embedding, fp16). Its hooks:

- :meth:`TargetPolicy.quantize` rewrites the in-memory graph after the graph stage (None for a target whose
  graphs are rebuilt on files: ``static_graphs``);
- :meth:`TargetPolicy.finish` runs once the bundle folder holds ``model.onnx``: the check of the graph
  ONNX Runtime runs (cpu, gpu), or the static QDQ graphs and their verification (npu);
- :meth:`TargetPolicy.rotation_note` says when a preset's measured best is the other rotation setting.

The registry is :data:`qsvd_export.targets.TARGETS`; the CLI reads its choices from it.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsvd_export.bundle import GRAPH_FILE, BundleConfig
from qsvd_export.errors import RuntimeFailure, UsageError
from qsvd_export.quant.presets import Bits, parse_bits

if TYPE_CHECKING:  # the graph libraries load when a target runs, not when the CLI starts
    import onnx_ir as ir

    from qsvd_export.targets.npu.options import NpuOptions


@dataclass(frozen=True)
class TargetPolicy:
    name: str
    default_bits: str
    allowed_bits: tuple[str, ...]
    block_size: int = 32
    output_matmul_bits: int | None = 8  # under lower-bit weights, MatMuls producing graph outputs (the lm_head)
    weight_range_grid: tuple[float, ...] = (1.0,)  # MatMulNBits block range shrinks searched by weight MSE
    smoothed_default: str | None = None  # export's default when activation-aware smoothing is possible
    float16: bool = False  # convert activations, float weights and the cache to fp16 after quantizing
    quantize_embedding: bool = False  # an fp32 table read only by Gather → 8-bit GatherBlockQuantized
    fuse_attention: bool = False  # dense-cache attention → com.microsoft.GroupQueryAttention (plain causal models)
    static_graphs: bool = False  # graphs rebuilt on files by finish(): decoders only, calibrated on text
    description: str = ""  # one line for --help

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
            from qsvd_export.passes.contracts import run_passes
            from qsvd_export.passes.group_query_attention import FuseGroupQueryAttentionPass

            fuse = FuseGroupQueryAttentionPass(latent)
            run_passes(model, [fuse])
            fusion = fuse.report.as_dict()
            if fusion["group_query_attention"]:
                fusion["attention_mask"] = "right padding only (GroupQueryAttention reads each row's length)"
        unfused = self._speed_up_unfused_attention(model) if self.fuse_attention else {}
        report = self._quantize_weights(model, bits)
        if fusion is not None:
            report["attention"] = fusion
        report.update(unfused)
        if self.float16:
            from qsvd_export.passes.contracts import run_passes
            from qsvd_export.passes.float16 import Float16Pass

            half = Float16Pass()
            run_passes(model, [half])
            report["float16"] = half.report.as_dict()  # type: ignore[union-attr]
        return report

    def finish(self, folder: Path, config: BundleConfig, report: dict[str, Any], strict: bool, tokenizer: Any,
               npu_options: NpuOptions | None, verify: bool, timings: dict[str, float]) -> dict[str, Any]:
        """File-level steps once ``folder`` holds ``model.onnx``; returns the completed target report (wall times
        go to ``timings``). Here: the check of the graph ONNX Runtime runs (:func:`check_optimized_graph`)."""
        check_optimized_graph(folder / GRAPH_FILE, report, strict)
        return report

    def rotation_note(self, bits: str, rotate: bool) -> str | None:
        """A note when ``bits`` measured better with the other ``--rotate`` setting (None: nothing to say)."""
        return None

    @staticmethod
    def _speed_up_unfused_attention(model: ir.Model) -> dict[str, Any]:
        """Attention left unfused (the latent rebuild form, sliding-window models): scores per KV-head group instead
        of over repeated keys (:mod:`~qsvd_export.passes.grouped_query_scores`), and where the graph rebuilds keys
        from a latent cache, its rotary embeddings as ``RotaryEmbedding`` nodes
        (:mod:`~qsvd_export.passes.fuse_rotary`).
        Measured on smollm2 kv=0.5 (int8 latent, 2,048 cached tokens, ``benchmarks.profile_decode``): the rebuild's
        repeat 9 ms and its RoPE 22 ms of a 100 ms step → 3 ms."""
        from qsvd_export.passes.contracts import run_passes
        from qsvd_export.passes.fuse_rotary import FuseRotaryEmbeddingPass
        from qsvd_export.passes.grouped_query_scores import GroupedQueryScoresPass
        from qsvd_export.passes.quantize_latent_cache import LATENT_INPUT

        report: dict[str, Any] = {}
        regroup = GroupedQueryScoresPass()
        run_passes(model, [regroup])
        if regroup.rewritten:
            report["grouped_query_scores"] = regroup.rewritten
        if any(LATENT_INPUT.match(v.name or "") for v in model.graph.inputs):
            rotary = FuseRotaryEmbeddingPass()
            run_passes(model, [rotary])
            report["rotary_embedding"] = {"fused": rotary.fused,
                                          **({"skipped": rotary.skipped} if rotary.skipped else {})}
        return report

    def _quantize_weights(self, model: ir.Model, bits: Bits) -> dict[str, Any]:
        """Weight-only MatMulNBits. With 4-bit weights the MatMuls that produce graph outputs (the lm_head)
        stay at ``output_matmul_bits`` (8): measured on smollm2 (8 windows), int4 everywhere costs 1.33×
        perplexity, int8 lm_head brings it to 1.22× (dev split: docs/decisions.md). No block range search
        (``weight_range_grid``), also by measurement."""
        if bits.weights is None:
            return {"quantized_matmuls": 0}
        accuracy_level = 4 if bits.activations == 8 else 1
        report: dict[str, Any] = {"block_size": self.block_size, "accuracy_level": accuracy_level,
                                  "weights": "symmetric round-to-nearest, signed block scale"}
        from qsvd_export.passes.quantize_weights import QuantizeWeightsPass, WeightQuantReport

        done = WeightQuantReport()
        grid = self.weight_range_grid
        if self.output_matmul_bits is not None and bits.weights < self.output_matmul_bits:
            outputs = {v.name for v in model.graph.outputs}
            heads = frozenset(n.name for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name in outputs)
            others = frozenset(n.name for n in model.graph if n.op_type == "MatMul") - heads
            QuantizeWeightsPass(self.output_matmul_bits, self.block_size, accuracy_level, exclude=others,
                                symmetric=True, report=done, grid=grid)(model)
            report[f"output_matmuls_at_{self.output_matmul_bits}_bits"] = list(done.quantized)
        QuantizeWeightsPass(bits.weights, self.block_size, accuracy_level, symmetric=True, report=done,
                            grid=grid)(model)
        report.update(done.as_dict())
        if self.quantize_embedding:  # after the lm_head took its own copy of a tied table
            from qsvd_export.passes.quantize_embedding import QuantizeEmbeddingPass

            embedding = QuantizeEmbeddingPass(self.block_size)
            embedding(model)
            report.update(embedding.report.as_dict())
        return report


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


def check_optimized_graph(graph_path: Path, report: dict[str, Any], strict: bool) -> None:
    """Inspect the graph ONNX Runtime will run; with ``strict``, any float constant-weight MatMul is an error."""
    if report["bits"] == "fp":
        return
    counts = optimized_op_counts(graph_path)
    report["onnxruntime_optimized_graph"] = counts
    if strict and counts["float_matmuls_with_constant_weight"]:
        raise RuntimeFailure(f"--strict: {counts['float_matmuls_with_constant_weight']} MatMuls with constant "
                             f"weights stay float for target {report['target']}, e.g. {', '.join(counts['examples'])}")
