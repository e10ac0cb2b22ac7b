"""Options of the npu target (static graph sizes, calibration, int4 blocks, HTP architecture) and the
bundle file names it writes."""

from __future__ import annotations

from dataclasses import dataclass

from qsvd_export.errors import RuntimeFailure, UsageError
from qsvd_export.quant.activation_ranges import METHODS as CALIBRATION_METHODS

NPU_BITS = ("w8a16", "w8a8", "w4a16", "w4a8")  # the presets QNN HTP runs (8/16-bit activations)
HTP_ARCH = "73"  # Snapdragon 8 Gen 2 generation: 16-bit x 16-bit MatMul (v68, the backend default, has none)


@dataclass(frozen=True)
class NpuOptions:
    prefill_length: int = 128
    context_length: int = 1024
    mask_value: float = 100.0
    calibration_windows: int = 8  # each gives 2 prefill chunks and `calibration_decode_steps` decode feeds
    calibration_decode_steps: int = 4
    # the 8-bit activations' ranges (activation_ranges.py): mse clipping, chosen by measurement (smollm2 w8a8 + H1:
    # 1.015x dense; minmax 1.022x, percentile 1.438x; docs/results.md)
    calibration_method: str = "mse"
    # per-channel weight ranges: mse clip search (weight_ranges.py; activation-weighted at 4 bits) or "none"
    weight_clip: str = "mse"
    # int4 weights (w4a16): LPBQ blocks of this many input channels (block_weights.py), 0 = per channel. smollm2
    # w4a16 (32 x 128 wiki_eval): per channel 1.647x dense, blocks of 64 1.226x, 32 1.154x, 16 1.134x
    int4_block: int = 32
    htp_arch: str = HTP_ARCH
    verify_tokens: int = 4  # greedy decode steps after one prefill window, on HTP and on the CPU EP
    precompile: bool = False  # write QNN context binaries (EPContext models) beside the QDQ graphs
    # cache I/O: 8 / 16 = uint8 / uint16 codes with static scales (cache_io.py), 32 = float. Chosen on the dev split
    # (smollm2 w8a16, 8 x 512 tokens): float I/O 1.0114x dense, uint16 1.0190x, uint8 1.0205x at a quarter of the bytes
    cache_bits: int = 8

    def check(self) -> None:
        if not 1 < self.prefill_length < self.context_length:
            raise UsageError(f"--prefill-length must be in (1, context length {self.context_length})")
        if self.int4_block < 0 or self.int4_block % 16:
            raise UsageError(f"--int4-block must be 0 (per channel) or a positive multiple of 16, not {self.int4_block}")
        if self.weight_clip not in ("mse", "none"):
            raise UsageError(f"unknown weight clip '{self.weight_clip}' (mse or none)")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise UsageError(f"unknown calibration method '{self.calibration_method}' "
                             f"(choose from {', '.join(CALIBRATION_METHODS)})")
        if self.cache_bits not in (8, 16, 32):
            raise UsageError(f"--kv-bits {self.cache_bits} is not available for target npu (8, 16, or 32 for float)")
        if self.precompile:
            require_qnn("--precompile")  # before any slow step


GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx"}


CONTEXT_FILES = {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}  # + <name>_qnn.bin each


def require_qnn(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        raise RuntimeFailure(f"{what} needs the QNN execution provider; fix: pip install 'qsvd-export[npu]'")

