"""npu target quality: build the static QDQ graphs from a bundle and score them on the CPU EP.

    python -m benchmarks.npu_quality BUNDLE --bits w8a16 [--windows 32] [--calibration-method mse|minmax|percentile]
        [--int4-block 64] [--kv-bits 8|16|32] [--split eval|dev] [--window-length 128]
        [--verify [--htp-arch 73]] [--json OUT.json]

BUNDLE is a dynamic-graph bundle (``qsvd-export export`` / ``compress`` output). Prints one JSON line:
perplexity of the bundle's fp32 graph and of the static QDQ graphs on the same ``--windows`` ×
``--window-length`` windows (a multiple of the prefill length: longer windows run as consecutive prefill
chunks over the cache) of wiki_eval (``--split eval``) or the dev split (``--split dev``, the last windows of
wiki_calib, for choosing defaults), build time, HTP violations, peak RSS and, with ``--verify``, the QNN HTP
check (CPU fallback disabled; argmax agreement with the CPU EP).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from benchmarks import emit_json_line
from qsvd_export.bundle import bundle_tokenizer, load_bundle_config
from qsvd_export.data import dev_windows, read_text, token_windows
from qsvd_export.targets.npu.bundle import build_npu_graphs
from qsvd_export.targets.npu.options import NpuOptions
from qsvd_export.targets.npu.verify import verify_on_qnn
from qsvd_export.quant.presets import parse_bits
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.metrics import perplexity
from qsvd_export.runtimes.static_decode import StaticDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--bits", default="w8a16")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--calibration-method", default="mse", choices=["minmax", "percentile", "mse"])
    parser.add_argument("--weight-clip", default="mse", choices=["mse", "none"])
    parser.add_argument("--int4-block", type=int, default=NpuOptions.int4_block,
                        help="w4 presets: LPBQ block size (0 = per-channel int4)")
    parser.add_argument("--kv-bits", type=int, default=NpuOptions.cache_bits, choices=[8, 16, 32],
                        help="cache I/O: uint8 / uint16 codes or float")
    parser.add_argument("--split", default="eval", choices=["eval", "dev"])
    parser.add_argument("--window-length", type=int, default=None, help="default: the prefill length")
    parser.add_argument("--verify", action="store_true", help="also run the QNN HTP check (minutes)")
    parser.add_argument("--htp-arch", default=NpuOptions.htp_arch, help="HTP architecture for --verify")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config, tokenizer = load_bundle_config(args.bundle), bundle_tokenizer(args.bundle)
    options = NpuOptions(calibration_windows=args.calibration_windows, htp_arch=args.htp_arch,
                         calibration_method=args.calibration_method, weight_clip=args.weight_clip,
                         int4_block=args.int4_block, cache_bits=args.kv_bits)
    length = args.window_length or options.prefill_length
    rows = (dev_windows(tokenizer, args.windows, length) if args.split == "dev"
            else token_windows(tokenizer, read_text("wiki_eval"), length, args.windows, source="wiki_eval"))
    result: dict = {"bundle": str(args.bundle), "bits": args.bits, "calibration": args.calibration_method,
                    "weight_clip": args.weight_clip, "int4_block": args.int4_block, "kv_bits": args.kv_bits,
                    "split": args.split, "windows": args.windows, "window_length": length}
    result["dense"] = round(perplexity(DecoderRunner(args.bundle).window_nlls(rows)), 4)
    with tempfile.TemporaryDirectory(prefix="npu-quality-") as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        _, report = build_npu_graphs(args.bundle / "model.onnx", out, config.cache, parse_bits(args.bits),
                                     tokenizer, options)
        result["build_s"] = round(time.perf_counter() - start, 1)
        result["htp_violations"] = sum(len(g["htp_violations"]) for g in report["graphs"].values())
        cache = config.cache
        if "cache_io" in report:  # the graphs take and give cache codes
            from qsvd_export.targets.npu.cache_io import coded_cache

            cache = coded_cache(config.cache, report["cache_io"], args.kv_bits)
            result["kv_bytes_per_token"] = sum(layer.bytes_per_token() for layer in cache)
        decoder = StaticDecoder.from_files(out / "prefill.onnx", out / "decode.onnx", cache,
                                           options.context_length, options.prefill_length)
        result["qdq_cpu"] = round(perplexity(decoder.window_nlls(rows)), 4)
        result["ratio"] = round(result["qdq_cpu"] / result["dense"], 4)
        if args.verify:
            result["qnn"] = verify_on_qnn(out, cache, tokenizer, options)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    emit_json_line(result, args.json)


if __name__ == "__main__":
    main()
