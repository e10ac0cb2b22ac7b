"""``npu``: Qualcomm QNN HTP. Static prefill/decode graphs with QDQ (uint16/uint8 activations, int8 weights per
channel or int4 weights in LPBQ blocks), built on files after the bundle is written; default ``w8a16``.

From the dynamic float decoder graph (after the graph stage, dense or latent cache):
1. ``static_shapes``: a prefill graph (``prefill_length`` tokens) and a decode graph (1 token), both over
   a right-aligned cache window of ``context_length`` slots (:mod:`.static_graphs`);
2. ``low_precision``: RMSNorm → SimplifiedLayerNormalization, mask constants clamped to ±``mask_value``;
3. calibration feeds made by running the *float* static graphs on ``wiki_calib`` text (first prefill
   chunks with an empty cache, second chunks and decode steps with the cache the float graphs built);
4. QDQ insertion with ONNX Runtime's QNN recipe (:mod:`.qdq`: ``get_qnn_qdq_config``, per-op rules, shared
   scales for data movement, 16-bit fixed scales for Sigmoid/Tanh): activations per-tensor uint16 (static,
   calibrated; ``a8`` presets: uint8 where the normalized stream enters q/k/v and the MLP gate, and at
   those MatMuls' outputs), MatMul weights symmetric per-output-channel int8;
5. one ``weights.data`` for both graphs (:mod:`.weights`), a check of every node against the HTP op set
   (:func:`qsvd_export.passes.npu_legalize.npu_violations`), and, when ``onnxruntime-qnn`` is installed, a
   QNN HTP session per graph with CPU fallback disabled plus a prefill window and greedy steps compared with
   the CPU EP (:mod:`.verify`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsvd_export.bundle import BundleConfig
from qsvd_export.quant.presets import Bits
from qsvd_export.targets.npu.options import NPU_BITS
from qsvd_export.targets.policy import TargetPolicy

if TYPE_CHECKING:
    import onnx_ir as ir

    from qsvd_export.targets.npu.options import NpuOptions


class NpuTarget(TargetPolicy):
    """Static QDQ graphs for QNN HTP, built by :meth:`finish` on the written ``model.onnx``."""

    def quantize(self, model: ir.Model, bits: Bits, plain_causal: bool = False,
                 latent: dict[int, Any] | None = None) -> dict[str, Any]:
        return {}  # static graphs + QDQ are built on files: finish()

    def finish(self, folder: Path, config: BundleConfig, report: dict[str, Any], strict: bool, tokenizer: Any,
               npu_options: NpuOptions | None, verify: bool, timings: dict[str, float]) -> dict[str, Any]:
        from qsvd_export.targets.npu.bundle import finish_npu_bundle  # onnxruntime and the QDQ tools: only when used

        return finish_npu_bundle(folder, config, report, strict, tokenizer, npu_options, verify, timings)

    def rotation_note(self, bits: str, rotate: bool) -> str | None:
        """Measured on smollm2, 32 × 128 wiki_eval tokens."""
        if bits == "w8a8" and not rotate:
            return ("note: npu w8a8 keeps the norm outputs' outlier channels in one 8-bit range without --rotate "
                    "(smollm2: 1.059x dense without, 1.015x with --rotate)")
        if bits.startswith("w4") and rotate:
            return ("note: npu int4 blocks lose precision on rotated weights "
                    "(smollm2 w4a16: 1.561x dense with --rotate, 1.154x without)")
        return None


NPU = NpuTarget("npu", default_bits="w8a16", allowed_bits=NPU_BITS, static_graphs=True,
                description="Qualcomm QNN HTP (static QDQ prefill/decode graphs)")
