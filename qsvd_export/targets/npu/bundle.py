"""The npu bundle: static QDQ graphs and their shared weights replace the dynamic ``model.onnx``."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qsvd_export.bundle import GraphSpec, LayerCache
from qsvd_export.errors import RuntimeFailure, UsageError
from qsvd_export.quant.presets import Bits
from qsvd_export.targets.npu.options import GRAPH_FILES, NPU_BITS, NpuOptions
from qsvd_export.targets.npu.qdq import blockwise_int4, insert_qdq
from qsvd_export.targets.npu.static_graphs import calibration_feeds, calibration_windows, static_float_graphs
from qsvd_export.targets.npu.verify import precompile_contexts, verify_on_qnn
from qsvd_export.targets.npu.weights import save_sharing_weights


def build_npu_graphs(dynamic_path: Path, folder: Path, cache: list[LayerCache], bits: Bits, tokenizer: Any,
                     options: NpuOptions) -> tuple[list[GraphSpec], dict[str, Any]]:
    """Write ``prefill.onnx`` and ``decode.onnx`` (QDQ) and their shared ``weights.data`` into ``folder``.

    The report's ``timings`` entry holds wall times (kept out of ``report.json`` by the caller)."""
    from qsvd_export.passes.npu_legalize import npu_violations
    from qsvd_export.progress import bar, info

    options.check()
    if bits.name not in NPU_BITS:
        raise UsageError(f"--bits {bits.name} is not available for target npu (choose from {', '.join(NPU_BITS)})")
    if tokenizer is None:
        raise UsageError("target npu calibrates activation ranges on text; this model has no tokenizer")
    report: dict[str, Any] = {"options": asdict(options), "graphs": {}, "timings": {}}
    windows = calibration_windows(tokenizer, options)
    specs = []
    with tempfile.TemporaryDirectory(prefix="qsvd-npu-") as tmp:
        work = Path(tmp)
        info(f"npu: static graphs (prefill {options.prefill_length}, decode 1, context {options.context_length})")
        float_paths, legalized = static_float_graphs(dynamic_path, work, options)
        info("npu: calibration feeds from the float static graphs")
        feeds = calibration_feeds(float_paths, cache, windows, options)
        qdq_paths = {}
        clips = None
        blocks = bits.weights == 4 and options.int4_block > 0
        if blocks:
            from qsvd_export.quant.weight_ranges import input_second_moments, matmul_weights

            info(f"npu: int4 weights in LPBQ blocks of {options.int4_block} (per-block scale search)")
            role_weights = {"prefill": matmul_weights(float_paths["prefill"])}
            row_weights = input_second_moments(float_paths["prefill"], feeds["prefill"], role_weights["prefill"])
        elif options.weight_clip == "mse":
            from qsvd_export.quant.weight_ranges import weight_clips

            info("npu: per-channel weight clips (MSE search)")
            clips = weight_clips(float_paths["prefill"], feeds["prefill"], bits.weights or 8)
        ranges = None
        if options.cache_bits != 32:
            from qsvd_export.targets.npu.cache_io import cache_overrides, cache_ranges, quantized_cache_io

            ranges = cache_ranges(feeds, cache)
        progress = bar(len(GRAPH_FILES), "npu activation ranges + QDQ (prefill, decode)")
        for role, filename in GRAPH_FILES.items():
            info(f"npu: QDQ {bits.name} for the {role} graph ({len(feeds[role])} calibration feeds)")
            start = time.perf_counter()
            qdq_paths[role] = work / filename
            fixed = cache_overrides(float_paths[role], ranges, cache, options.cache_bits) if ranges else None
            qdq = insert_qdq(float_paths[role], qdq_paths[role], bits, feeds[role], options.calibration_method, clips,
                             fixed)
            if blocks:
                weights = role_weights.pop(role, None) or matmul_weights(float_paths[role])
                qdq_paths[role] = blockwise_int4(qdq_paths[role], weights, options.int4_block, row_weights, qdq)
                del weights
            if ranges is not None:  # one (scale, zero point) per cache tensor, the same in both graphs
                coded = quantized_cache_io(qdq_paths[role], cache, options.cache_bits)
                if report.setdefault("cache_io", coded) != coded:
                    raise RuntimeFailure(f"npu: the {role} graph's cache codes differ from the prefill graph's")
            model = ir.load(qdq_paths[role])
            specs.append(GraphSpec(role, filename, [v.name for v in model.graph.inputs],
                                   [v.name for v in model.graph.outputs]))
            report["graphs"][role] = {**legalized[role], **qdq, "htp_violations": npu_violations(model)}
            report["timings"][f"npu_{role}_qdq_s"] = round(time.perf_counter() - start, 1)
            del model
            progress.update()
        progress.close()
        report["weights"] = save_sharing_weights(qdq_paths, folder)
    return specs, report


def finish_npu_bundle(folder: Path, config: Any, target_report: dict[str, Any], strict: bool, tokenizer: Any,
                      options: NpuOptions | None, verify: bool, timings: dict[str, float]) -> dict[str, Any]:
    """Turn a bundle folder holding the dynamic ``model.onnx`` into an npu bundle: static QDQ graphs and
    ``weights.data`` replace it, ``qsvd_config.json`` gets ``static_shapes``, then optional context
    binaries and the QNN check. Returns the target report; wall times go to ``timings``."""
    from qsvd_export.bundle import CONFIG_NAME
    from qsvd_export.errors import UnsupportedModelError
    from qsvd_export.progress import info
    from qsvd_export.quant.presets import parse_bits

    if config.kind != "decoder":
        raise UnsupportedModelError(f"target npu builds static decoder graphs; this is a {config.kind} model")
    options = options or NpuOptions()
    dynamic = folder / "model.onnx"
    specs, npu_report = build_npu_graphs(dynamic, folder, config.cache, parse_bits(target_report["bits"]),
                                         tokenizer, options)
    if "cache_io" in npu_report:  # the cache crosses the graph boundary as integer codes
        from qsvd_export.targets.npu.cache_io import coded_cache

        config.cache = coded_cache(config.cache, npu_report["cache_io"], options.cache_bits)
    for path in (dynamic, folder / "model.onnx.data"):
        path.unlink()
    config.graphs = specs
    config.static_shapes = {"context_length": options.context_length, "prefill_length": options.prefill_length,
                            "cache": "right-aligned", "htp_arch": options.htp_arch}
    violations = [v for graph in npu_report["graphs"].values() for v in graph["htp_violations"]]
    if strict and violations:
        raise RuntimeFailure(f"--strict: {len(violations)} nodes QNN HTP would not run, e.g. {violations[0]}")
    timings.update(npu_report.pop("timings"))
    report = {**target_report, **npu_report}
    contexts = None
    if options.precompile:
        info(f"npu: QNN HTP context binaries (htp_arch {options.htp_arch})")
        compiled = precompile_contexts(folder, options)
        timings.update(compiled["timings"])
        contexts = config.static_shapes["qnn_context_models"] = compiled["files"]
    (folder / CONFIG_NAME).write_text(config.to_json())
    if verify:
        info(f"npu: QNN HTP sessions (htp_arch {options.htp_arch}, CPU fallback disabled) and a greedy check")
        report["verification"] = verify_on_qnn(folder, config.cache, tokenizer, options, contexts)
        timings.update(report["verification"].pop("timings", {}))
    return report

