"""Our bundles against the peer tools, in one run on one model, data set and machine (issue 8).

    python -m benchmarks.run [--quick] [--out results/bench] [--dense DIR] [--ours-w4a8 DIR] [--ours-latent DIR]

Rows (smollm2-135m):

- ``dense``          dense fp32 ONNX: ``qsvd-export export smollm2-135m`` (``--dense DIR`` reuses one);
- ``ort-int8``       onnxruntime ``quantize_dynamic`` int8 (per-channel weights) on the dense graph;
- ``ort-int4-b32``   onnxruntime ``MatMulNBitsQuantizer`` int4 RTN (``DefaultWeightOnlyQuantConfig``), block 32,
                     ``accuracy_level=4`` (its best documented CPU setting);
- ``ort-int4-b128``  the same, block 128;
- ``ort-qnn-u16u8``  onnxruntime ``quantize_static`` with ``get_qnn_qdq_config`` (uint16 activations, uint8
                     per-channel weights, its defaults otherwise) on the same static float prefill/decode
                     graphs and the same calibration feeds as our npu target;
- ``ort-gqa-kv8`` / ``ort-gqa-kv4`` the dense cache quantized to int8 / int4 (static per-channel scales) inside
                     onnxruntime's fused ``GroupQueryAttention``, w8a8 weights as our latent cpu rows
                     (``qsvd-export export smollm2-135m --target cpu --bits w8a8 --kv-bits 8|4``; no onnxruntime
                     tool writes that graph);

A peer's label is its tool plus the settings its build record holds (read back from the built graph where
the graph carries them) and, for int8, the int8 dot-product flags of the CPU: nothing about a peer is typed
by hand (:func:`row_label`).
- ``ours-w8a8``      ``qsvd-export D/model.onnx --target cpu`` (graph stage, w8a8 default);
- ``ours-w4a8``      ``qsvd-export export smollm2-135m --target cpu`` (smoothed w4a8; ≈ 8 min to build,
                     ``--ours-w4a8 DIR`` reuses one, ``--quick`` skips it without);
- ``ours-latent``    the QSVD kv=0.5 latent bundle (``qsvd-export compress smollm2-135m --budget kv=0.5``;
                     ≈ 50 min, ``--ours-latent DIR`` reuses one, ``--quick`` skips it without), fp32
                     (measured in full mode only; ``--quick`` uses it as the next row's source);
- ``ours-latent-w8a8`` ``qsvd-export LATENT/model.onnx --target cpu --kv-bits 32`` on it (float latent cache);
- ``ours-latent-kv8`` ``qsvd-export LATENT/model.onnx --target cpu --kv-bits 8`` on it (int8 latent cache I/O, the
                     default);
- ``ours-latent-kv4`` ``qsvd-export LATENT/model.onnx --target cpu --kv-bits 4`` on it (4-bit latent, two codes per
                     byte, the first token exact);
- ``ours-npu``       ``qsvd-export D/model.onnx --target npu --no-verify`` (static QDQ graphs, w8a16);
- ``ours-latent-npu`` ``qsvd-export LATENT/model.onnx --target npu --no-verify``.

npu rows (static prefill 128 / decode graphs over a 1024-slot cache) are scored on the same 512-token
windows, fed as 4 prefill chunks through the cache, on the CPU EP running their QDQ graphs. Their speed
is the NPU's, not this machine's: the CPU EP emulates QDQ, so no speed columns for them.

Chat quality (``--chat-rows``, default the cpu, latent cpu and npu defaults and the int8 KV peer;
:mod:`benchmarks.bench_chat`): KL to dense and top-1 agreement on chat prompts, closed-book QA answers kept of
dense's; ``--from-json RUN.json --measure-chat`` adds them to an earlier run's rows (same bundle files, checked).

Per row: perplexity on wiki_eval and news_eval (EVAL.md: 32 × 512 windows, each one prefill through
``DecoderRunner.window_nlls``; ``--quick``: 4 windows), KV bytes/token (``qsvd_config.json``; the peers
keep the dense cache), weight bytes on disk, prefill ms (512), decode tokens/s at 512 (and 2048 in full
mode), peak RSS, achieved ÷ roofline (all from ``benchmarks.decode_speed``'s worker: one subprocess per
bundle, medians of timed runs after a warm-up), build time; ratios against the dense row of the same run.

Writes ``OUT/bench.json`` (figures, machine, date, tool versions), ``OUT/bench.md`` (table), ``OUT/ppl_vs_kv.png`` and
``OUT/ppl_vs_decode.png`` (one marker per row, Pareto front). Built bundles go to ``--work``
(default ``OUT/bundles``) and are reused by later runs unless ``--rebuild``.

Fast ``--quick`` (< 10 min on the 2-core VM): give the slow torch-stage bundles, e.g.
``--dense /tmp/exp/sm-dense --ours-w4a8 /tmp/sm_mobile --ours-latent /tmp/exp/sm-kv50``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_chat import DEFAULT_CHAT_ROWS, add_chat, bundle_sizes, qa_cells
from benchmarks.labels import row_label
from benchmarks.pareto import dominated_by
from benchmarks.pareto import pareto_front as strict_front

MODEL = "smollm2-135m"
CORPORA = ("wiki_eval", "news_eval")
BUILD_FILE = "bench_build.json"


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    tool: str
    family: str  # "dense" | "peer" | "ours"
    quick: bool = True  # measured in --quick runs (False: only built/reused there, as another row's source)


ROWS = [
    Row("dense", "dense fp32", "qsvd-export export", "dense"),
    # peers: the base label only; their settings are appended from the build record (``row_label``)
    Row("ort-int8", "ORT quantize_dynamic int8", "onnxruntime.quantization.quantize_dynamic", "peer"),
    Row("ort-int4-b32", "ORT MatMulNBits int4 RTN", "onnxruntime MatMulNBitsQuantizer (DEFAULT/RTN)", "peer"),
    Row("ort-int4-b128", "ORT MatMulNBits int4 RTN", "onnxruntime MatMulNBitsQuantizer (DEFAULT/RTN)", "peer"),
    Row("ort-qnn-u16u8", "ORT quantize_static with get_qnn_qdq_config on the npu graphs",
        "onnxruntime get_qnn_qdq_config + quantize", "peer"),
    # KV-cache quantization without rank reduction, at the weight preset of our latent cpu rows (w8a8; issue 22):
    # onnxruntime's fused GroupQueryAttention with an int8 / int4 cache; no onnxruntime tool writes that graph, so
    # qsvd-export builds it
    Row("ort-gqa-kv8", "dense KV in ORT GroupQueryAttention, int8 cache",
        "qsvd-export export --target cpu --bits w8a8 --kv-bits 8", "peer", quick=False),
    Row("ort-gqa-kv4", "dense KV in ORT GroupQueryAttention, int4 cache",
        "qsvd-export export --target cpu --bits w8a8 --kv-bits 4", "peer", quick=False),
    Row("ours-w8a8", "ours: --target cpu (w8a8) on the dense graph", "qsvd-export D/model.onnx --target cpu", "ours"),
    Row("ours-w4a8", "ours: export --target cpu (smoothed w4a8)", "qsvd-export export --target cpu", "ours"),
    Row("ours-latent", "ours: QSVD kv=0.5 latent, fp32", "qsvd-export compress --budget kv=0.5", "ours", quick=False),
    Row("ours-latent-w8a8", "ours: QSVD kv=0.5 latent + --target cpu --kv-bits 32 (w8a8, float latent)",
        "qsvd-export LATENT/model.onnx --target cpu --kv-bits 32", "ours"),
    Row("ours-latent-kv8", "ours: QSVD kv=0.5 latent + --target cpu (w8a8, int8 latent: the default)",
        "qsvd-export LATENT/model.onnx --target cpu --kv-bits 8", "ours"),
    Row("ours-latent-kv4",
        "ours: QSVD kv=0.5 latent + --target cpu --kv-bits 4 (w8a8, 4-bit latent, exact first token)",
        "qsvd-export LATENT/model.onnx --target cpu --kv-bits 4", "ours"),
    Row("ours-npu", "ours: --target npu (w8a16) on the dense graph", "qsvd-export D/model.onnx --target npu", "ours"),
    Row("ours-latent-npu", "ours: QSVD kv=0.5 latent + --target npu (w8a16)", "qsvd-export LATENT/model.onnx --target npu",
        "ours"),
]
PARENTS = {"ort-int8": "dense", "ort-int4-b32": "dense", "ort-int4-b128": "dense", "ort-qnn-u16u8": "dense",
           "ours-w8a8": "dense", "ours-npu": "dense", "ours-latent-w8a8": "ours-latent",
           "ours-latent-kv8": "ours-latent", "ours-latent-kv4": "ours-latent", "ours-latent-npu": "ours-latent"}
ROW_NAMES = [r.name for r in ROWS]
LATENT_KV_BITS = {"ours-latent-w8a8": 32, "ours-latent-kv8": 8, "ours-latent-kv4": 4}  # --kv-bits of our latent rows

# Columns of bench.md: (header, row key, format). Ratios vs dense follow the value in parentheses.
COLUMNS = [
    ("wiki_eval ppl", "wiki_eval", "{:.3f}"),
    ("news_eval ppl", "news_eval", "{:.3f}"),
    ("R1", "r1", "{:.2f}"),
    ("R2", "r2", "{:.2f}"),
    ("KV B/token", "kv_bytes_per_token", "{:,.0f}"),
    ("weights MB", "weight_mb", "{:.1f}"),
    ("chat KL", "chat_kl", "{:.3f}"),
    ("chat top-1", "chat_top1", "{:.3f}"),
    ("QA correct", "qa_correct_text", "{}"),
    ("dense's QA kept", "qa_kept_text", "{}"),
    ("prefill 512 ms", "prefill_512_ms", "{:.0f}"),
    ("decode@512 tok/s", "decode_512_tok_s", "{:.1f}"),
    ("decode@2048 tok/s", "decode_2048_tok_s", "{:.1f}"),
    ("÷ roofline @512", "achieved_over_roofline_512", "{:.2f}"),
    ("÷ roofline @2048", "achieved_over_roofline_2048", "{:.2f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("build s", "build_s", "{:.0f}"),
]
RATIO_KEYS = ("wiki_eval", "news_eval", "kv_bytes_per_token", "weight_mb", "prefill_512_ms", "decode_512_tok_s",
              "decode_2048_tok_s")


# ---------------------------------------------------------------- bundle helpers

def _qsvd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qsvd_export", *args]


def copy_bundle_files(dense: Path, out: Path) -> None:
    """Everything a DecoderRunner needs besides the graph: qsvd_config.json (graph I/O unchanged) + tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((dense / "qsvd_config.json").read_text())
    for graph in config["graphs"]:
        graph.pop("ort_filename", None)  # the peers have no ORT-format copy
    (out / "qsvd_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in config.get("tokenizer_files", []):
        if (dense / name).exists():
            shutil.copy2(dense / name, out / name)


def _save_model(model: Any, out: Path) -> None:
    import onnx

    for stale in (out / "model.onnx", out / "model.onnx.data"):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_dot_flags(cpuinfo: str | None = None) -> list[str] | None:
    """The x86 int8 dot-product flags (AVX512-VNNI / AVX-VNNI / AMX) this CPU reports in /proc/cpuinfo,
    read at run time; None where there is no flags line to read (not Linux x86)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if line is None:
        return None
    flags = set(line.split(":", 1)[-1].split())
    return [flag for flag in INT8_DOT_FLAGS if flag in flags]


def cpu_has_vnni() -> bool:
    """x86 VNNI (AVX512-VNNI / AVX-VNNI / AMX): ORT's u8s8 integer GEMM does not saturate there."""
    flags = cpu_int8_dot_flags()
    if flags is None:
        return platform.machine().lower() not in ("x86_64", "amd64")  # ARM: no u8s8 saturation issue
    return bool(flags)


def build_ort_int8(dense: Path, out: Path, reduce_range: bool | None = None) -> dict:
    """onnxruntime dynamic quantization: int8 weights (per output channel), uint8 activations at run time.

    ``reduce_range`` (7-bit weights) defaults to on for x86 without VNNI, as onnxruntime's quantization
    docs advise: there the AVX2 u8s8 kernels (VPMADDUBSW) saturate int16 sums. On this 2-core AVX2 VM the
    plain 8-bit recipe gave wiki_eval perplexity ~5e6 (8 windows; dense 13.96), 7-bit weights ~1.6× dense.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    copy_bundle_files(dense, out)
    tmp = out / "tmp.onnx"
    quantize_dynamic(str(dense / "model.onnx"), str(tmp), per_channel=True, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, use_external_data_format=True)
    model = onnx.load(str(tmp))
    _save_model(model, out)
    tmp.unlink()
    Path(str(tmp) + ".data").unlink(missing_ok=True)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"options": {"per_channel": True, "weight_type": "QInt8", "reduce_range": reduce_range,
                        "cpu_vnni": cpu_has_vnni(), "cpu_int8_dot_flags": cpu_int8_dot_flags(),
                        "op_types": "default (IntegerOpsRegistry)"},
            "quantized_nodes": {k: v for k, v in ops.items() if "Integer" in k or "Quant" in k}}


INT4_ACCURACY_LEVEL = 4  # int8 compute of the activations: ORT's documented fastest CPU setting for MatMulNBits


def build_ort_int4(dense: Path, out: Path, block_size: int, accuracy_level: int | None = INT4_ACCURACY_LEVEL) -> dict:
    """onnxruntime MatMulNBits int4 round-to-nearest (ORT's DEFAULT weight-only quantizer) at its best
    documented CPU setting, ``accuracy_level`` 4; ORT defaults otherwise. The recorded options are read
    back from the quantized graph's MatMulNBits attributes, not from the arguments."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    copy_bundle_files(dense, out)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, accuracy_level=accuracy_level)  # asymmetric
    quantizer = MatMulNBitsQuantizer(onnx.load(str(dense / "model.onnx")), algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    _save_model(model, out)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    return {"options": {"bits": _one_value(a.get("bits") for a in attributes),
                        "block_size": _one_value(a.get("block_size") for a in attributes),
                        "is_symmetric": config.is_symmetric,
                        "accuracy_level": _one_value(a.get("accuracy_level") for a in attributes),
                        "algorithm": config.algorithm},
            "quantized_nodes": {"MatMulNBits": len(nodes)}}


def _one_value(values: Any) -> Any:
    """The value every node carries (None when absent on all), or the sorted distinct values."""
    distinct = sorted({v for v in values if v is not None})
    return None if not distinct else distinct[0] if len(distinct) == 1 else distinct


def _run_cli(cmd: list[str], log: Path) -> None:
    with log.open("w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")


def build_ours_target(source: Path, out: Path, target: str, prefill_length: int = 128, context_length: int = 1024,
                      kv_bits: int | None = None) -> dict:
    """The graph stage with ``--target`` (its default bits, ``--kv-bits`` when given) on a bundle's model.onnx; keeps
    its tokenizer files.

    The graph stage on a bare ONNX file finds the tokenizer (npu calibration) beside it."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = (["--no-verify", "--prefill-length", str(prefill_length), "--context-length", str(context_length)]
             if target == "npu" else [])
    if kv_bits is not None:
        extra += ["--kv-bits", str(kv_bits)]
    _run_cli(_qsvd("compile", str(source / "model.onnx"), "--target", target, *extra, "-o", str(out), "-q"),
             out.parent / f"{out.name}.log")
    config = json.loads((out / "qsvd_config.json").read_text())
    for name in config.get("tokenizer_files", []):  # the graph stage on a bare ONNX file has no tokenizer
        if not (out / name).exists() and (source / name).exists():
            shutil.copy2(source / name, out / name)
    report = json.loads((out / "report.json").read_text())
    options = {"target": target, "bits": f"{report['target']['bits']} (default)"}
    if kv_bits is not None:
        options["kv_bits"] = kv_bits
    return {"options": options}


def build_ort_qnn(dense: Path, out: Path, prefill_length: int = 128, context_length: int = 1024,
                  per_channel: bool = True) -> dict:
    """onnxruntime's QNN recipe at its best documented setting: ``get_qnn_qdq_config`` (uint16
    activations, uint8 weights, **per-channel** weights: ``per_channel=True`` plus per-channel
    ``init_overrides`` for the MatMul weights, :func:`matmul_per_channel_overrides`; MinMax) + ``quantize``
    on the static float prefill/decode graphs our npu target builds from the same dense graph, calibrated
    on the same feeds. The two graphs share one weights file as ours do (``save_sharing_weights``), so weight bytes compare
    the quantization, not the packaging. The recorded per-channel figure is counted in the built graphs
    (weight DequantizeLinear nodes with one scale per output channel)."""
    import logging
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from qsvd_export.bundle import CONFIG_NAME, GraphSpec, bundle_tokenizer, load_bundle_config
    from qsvd_export.targets.npu.options import GRAPH_FILES, NpuOptions
    from qsvd_export.targets.npu.static_graphs import FeedReader, calibration_feeds, calibration_windows, static_float_graphs
    from qsvd_export.targets.npu.weights import save_sharing_weights

    copy_bundle_files(dense, out)
    config = load_bundle_config(out)
    options = NpuOptions(prefill_length=prefill_length, context_length=context_length)
    ort.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-qnn-") as tmp:
        work = Path(tmp)
        float_paths, _ = static_float_graphs(dense / "model.onnx", work, options)
        feeds = calibration_feeds(float_paths, config.cache, calibration_windows(bundle_tokenizer(dense), options),
                                  options)
        qdq_paths = {}
        for role, filename in GRAPH_FILES.items():
            overrides = matmul_per_channel_overrides(float_paths[role], QuantType.QUInt8) if per_channel else None
            recipe = get_qnn_qdq_config(str(float_paths[role]), FeedReader(feeds[role]),
                                        activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8,
                                        per_channel=per_channel, init_overrides=overrides)
            recipe.use_external_data_format = True
            qdq_paths[role] = work / filename
            quantize(str(float_paths[role]), str(qdq_paths[role]), recipe)
        save_sharing_weights(qdq_paths, out)
    specs, weight_scales = [], {"per_channel": 0, "per_tensor": 0}
    for role, filename in GRAPH_FILES.items():
        graph = onnx.load(str(out / filename), load_external_data=False).graph
        specs.append(GraphSpec(role, filename, [v.name for v in graph.input], [v.name for v in graph.output]))
        for kind, count in weight_scale_kinds(graph).items():
            weight_scales[kind] += count
    config.graphs = specs
    config.static_shapes = {"context_length": options.context_length, "prefill_length": options.prefill_length,
                            "cache": "right-aligned"}
    (out / CONFIG_NAME).write_text(config.to_json())
    return {"options": {"activation_type": "QUInt16", "weight_type": "QUInt8", "per_channel": per_channel,
                        "weight_dequantize_nodes": weight_scales,
                        "calibration": f"MinMax, {options.calibration_windows} windows of wiki_calib (as ours)",
                        "prefill_length": options.prefill_length, "context_length": options.context_length}}


def kv_cache_options(bundle: Path) -> dict[str, Any]:
    """What a KV-quantized bundle's report says about its cache and weights (the peer's label reads it)."""
    report = json.loads((bundle / "report.json").read_text())
    latent = report.get("latent_attention", {})
    return {"cache_bits": latent.get("cache_bits"), "cache_form": latent.get("form"),
            "weights": (report.get("target") or {}).get("bits")}


def matmul_per_channel_overrides(graph_path: Path, weight_type: Any) -> dict[str, list[dict[str, Any]]]:
    """``get_qnn_qdq_config`` tensor overrides giving every MatMul weight (a 2-D initializer) one scale per
    output channel (axis 1). The recipe's global ``per_channel`` covers Conv/Gemm-like ops only and keeps
    MatMul per-tensor; its documented way to choose per-channel axes for other ops is these overrides."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer if len(t.dims) == 2}
    return {n.input[1]: [{"quant_type": weight_type, "axis": 1}] for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in weights}


def weight_scale_kinds(graph: Any) -> dict[str, int]:
    """Weight DequantizeLinear nodes of a QDQ graph (input 0 an initializer of rank ≥ 2), counted by
    whether their scale holds one value (per tensor) or several (per channel)."""
    inits = {t.name: t for t in graph.initializer}
    counts = {"per_channel": 0, "per_tensor": 0}
    for node in graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is None or len(weight.dims) < 2 or node.input[1] not in inits:
            continue
        counts["per_channel" if math.prod(inits[node.input[1]].dims) > 1 else "per_tensor"] += 1
    return counts


def compression_ratios(bundle: Path, sources: list[Path | None]) -> tuple[float, float]:
    """(R1, R2) of a bundle's attention: its report's plan figures, else its source bundle's (a target
    build on a QSVD bundle keeps its plan), else 1.0 (Q/K/V weights and cache left full)."""
    for folder in (bundle, *sources):
        path = folder / "report.json" if folder is not None else None
        if path is not None and path.exists():
            report = json.loads(path.read_text())
            if "r1" in report:
                return float(report["r1"]), float(report["r2"])
    return 1.0, 1.0


def reused_build_seconds(bundle: Path) -> float | None:
    """Build time recorded by the CLI in a reused bundle's timings.json (evaluation and --mobile left out)."""
    path = bundle / "timings.json"
    if not path.exists():
        return None
    timings = json.loads(path.read_text())
    return round(sum(v for k, v in timings.items() if k not in ("eval_s", "mobile_s")), 1)


# The peers' best documented settings (EVAL.md); a bundle an earlier run built otherwise is rebuilt.
PEER_SETTINGS = {"ort-int4-b32": {"accuracy_level": INT4_ACCURACY_LEVEL},
                 "ort-int4-b128": {"accuracy_level": INT4_ACCURACY_LEVEL},
                 "ort-qnn-u16u8": {"per_channel": True},
                 "ort-gqa-kv8": {"weights": "w8a8"}, "ort-gqa-kv4": {"weights": "w8a8"}}


def settings_match(name: str, info: dict) -> bool:
    """Whether a reused build record holds the settings this run builds ``name`` with."""
    options = info.get("options", {})
    return all(options.get(key) == value for key, value in PEER_SETTINGS.get(name, {}).items())


def build_row(name: str, args: argparse.Namespace, built: dict[str, Path]) -> tuple[Path | None, dict]:
    """Build (or reuse) one row's bundle. Returns (bundle or None if skipped, build info)."""
    work: Path = args.work
    out = work / name
    given = {"dense": args.dense, "ours-w4a8": args.ours_w4a8, "ours-latent": args.ours_latent}.get(name)
    if given is not None:
        return given, {"reused": str(given), "build_s": reused_build_seconds(given), "note": "existing bundle"}
    record = out / BUILD_FILE
    if record.exists() and not args.rebuild:
        info = json.loads(record.read_text())
        if settings_match(name, info):
            return out, {**info, "note": f"built by an earlier run ({info.get('date', '?')}), reused"}
    parents = PARENTS
    if name in parents and parents[name] not in built:
        return None, {"skipped": f"needs the {parents[name]} row"}
    slow = {"dense": ["export", MODEL], "ours-w4a8": ["export", MODEL, "--target", "cpu"],
            "ours-latent": ["compress", MODEL, "--budget", "kv=0.5"],
            **{f"ort-gqa-kv{bits}": ["export", MODEL, "--target", "cpu", "--bits", "w8a8", "--kv-bits", str(bits)]
               for bits in (8, 4)}}
    if name in slow and args.quick and name != "dense":
        return None, {"skipped": f"--quick builds no torch-stage bundle; pass --{name} DIR to include it"}
    start = time.perf_counter()
    if name in slow:
        if out.exists():
            shutil.rmtree(out)
        work.mkdir(parents=True, exist_ok=True)
        _run_cli(_qsvd(*slow[name], "-o", str(out), "-q"), work / f"{name}.log")
        info: dict = {"command": "qsvd-export " + " ".join(slow[name])}
        if name.startswith("ort-gqa-kv"):
            info["options"] = kv_cache_options(out)
    elif name == "ort-int8":
        info = build_ort_int8(built["dense"], out)
    elif name.startswith("ort-int4-b"):
        info = build_ort_int4(built["dense"], out, int(name.rsplit("b", 1)[1]))
    elif name == "ort-qnn-u16u8":
        info = build_ort_qnn(built["dense"], out)
    else:
        info = build_ours_target(built[parents[name]], out, "npu" if name.endswith("-npu") else "cpu",
                                 kv_bits=LATENT_KV_BITS.get(name))
    info["build_s"] = round(time.perf_counter() - start, 1)
    info["date"] = time.strftime("%Y-%m-%d %H:%M")
    if name in parents:
        info["from"] = str(built[parents[name]])
    record.write_text(json.dumps(info, indent=1) + "\n")
    return out, info


# ---------------------------------------------------------------- measurements

def eval_windows(bundle: Path, count: int, length: int = 512) -> dict[str, Any]:
    from qsvd_export.bundle import bundle_tokenizer
    from qsvd_export.data import read_text, token_windows

    tokenizer = bundle_tokenizer(bundle)
    return {name: token_windows(tokenizer, read_text(name), length, count, source=name) for name in CORPORA}


def measure_quality(bundle: Path, windows: dict[str, Any], threads: int | None = None) -> dict[str, float]:
    """EVAL.md perplexity of one bundle on each corpus (a fresh prefill per window)."""
    from qsvd_export.bundle import load_bundle_config
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity
    from qsvd_export.runtimes.sessions import SessionOptions
    from qsvd_export.runtimes.static_decode import StaticDecoder

    config = load_bundle_config(bundle)
    options = SessionOptions(threads=threads)
    runner = StaticDecoder.from_bundle(bundle, "cpu", options) if config.static_shapes else DecoderRunner(bundle, "cpu", options)
    result = {name: perplexity(runner.window_nlls(rows)) for name, rows in windows.items()}
    result["kv_bytes_per_token"] = config.kv_bytes_per_token()
    return result


def measure_speed(bundles: list[Path], contexts: list[int], runs: int, new_tokens: int, rounds: int,
                  threads: int, out: Path) -> dict:
    """benchmarks.decode_speed over all bundles in one call (first = baseline); its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.decode_speed", *map(str, bundles), "--contexts", *map(str, contexts),
           "--runs", str(runs), "--new-tokens", str(new_tokens), "--rounds", str(rounds), "--threads", str(threads),
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.read_text())


# ---------------------------------------------------------------- environment

def machine() -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    info["cpu_int8_dot_flags"] = cpu_int8_dot_flags()  # read at run time: the int8 peer's label names them
    info["load_average"] = os.getloadavg()
    return info


def tool_versions() -> dict[str, str]:
    """Bundle report's tool versions ("not installed" for missing ones) + the repository's git commit."""
    from qsvd_export import report

    versions = {k: v or "not installed" for k, v in report.tool_versions().items()}
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        versions["git"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return versions


# ---------------------------------------------------------------- report

def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "dense" and "error" not in r), None)
    if base is None:
        return
    for row in rows:
        row["ratios"] = {k: row[k] / base[k] for k in RATIO_KEYS if row.get(k) is not None and base.get(k)}


# Pareto checks: (claims key, x key, x name for the text, x unit format). wiki_eval perplexity is the y axis.
PARETO_CHECKS = [("ppl_vs_kv", "kv_bytes_per_token", "KV bytes/token", "{:,.0f} B"),
                 ("ppl_vs_weights", "weight_bytes", "weight bytes", "{:,.0f} B")]


def claims(rows: list[dict]) -> dict:
    """The checks the table's text states, computed from the rows with :mod:`benchmarks.pareto`'s one rule.

    ``dominated``: per check (``PARETO_CHECKS``), per row of ours, the peer rows that dominate it on
    (wiki_eval perplexity, x): ≤ on both and < on one (empty = on the front against the peers).
    ``roofline_vs_dense``: per context, each of our rows' decode achieved ÷ roofline divided by the
    dense row's."""
    dominated: dict[str, dict[str, list[str]]] = {}
    for check, x_key, _, _ in PARETO_CHECKS:
        scored = [r for r in rows if r.get("wiki_eval") is not None and r.get(x_key) is not None]
        peers = {r["name"]: (r["wiki_eval"], r[x_key]) for r in scored if r["family"] == "peer"}
        dominated[check] = {r["name"]: dominated_by((r["wiki_eval"], r[x_key]), peers)
                            for r in scored if r["family"] == "ours"}
    dense = next((r for r in rows if r["name"] == "dense"), {})
    roofline: dict[str, dict[str, float]] = {}
    for key in sorted(k for k in dense if k.startswith("achieved_over_roofline_")):
        roofline[key.rsplit("_", 1)[1]] = {r["name"]: r[key] / dense[key] for r in rows
                                           if r["family"] == "ours" and r.get(key) is not None}
    return {"dominated": dominated, "roofline_vs_dense": roofline}


def render_claims(checks: dict, rows: list[dict]) -> list[str]:
    """One line per (check, row of ours): on the front, or dominated by the named peers with their figures."""
    by_name = {r["name"]: r for r in rows}
    lines = ["Checks (computed from the rows above; a row is dominated when a peer row is ≤ on both axes and "
             "< on at least one):"]
    for check, x_key, x_name, x_format in PARETO_CHECKS:
        for name, peers in checks["dominated"].get(check, {}).items():
            mine = by_name[name]
            if not peers:
                lines.append(f"- {name}, wiki_eval perplexity vs {x_name}: on the front (no peer row dominates it)")
                continue
            figures = "; ".join(f"{p}: {by_name[p]['wiki_eval']:.3f} at {x_format.format(by_name[p][x_key])}"
                                for p in peers)
            lines.append(f"- {name}, wiki_eval perplexity vs {x_name}: **dominated** by {', '.join(peers)} "
                         f"({name}: {mine['wiki_eval']:.3f} at {x_format.format(mine[x_key])}; {figures})")
    for context, ratios in checks["roofline_vs_dense"].items():
        for name, ratio in ratios.items():
            lines.append(f"- decode @{context} achieved ÷ roofline, {name} vs dense: {ratio:.2f}× "
                         + ("(≥ dense)" if ratio >= 1 else "(**below dense**)"))
    return lines + [""]


BASE_LABELS = {r.name: r.label for r in ROWS}


def label_of(row: dict) -> str:
    """The row's label: the base label of its ROWS entry, and for a peer the settings of its build record."""
    return row_label(row, BASE_LABELS.get(row["name"], row.get("label", row["name"])))


def _int8_flags_text(machine_info: dict) -> str:
    flags = machine_info.get("cpu_int8_dot_flags")
    if flags is None:
        return ""
    return f"; int8 dot-product CPU flags at run time: {', '.join(flags) if flags else 'none (no VNNI/AMX)'}"


def _chat_text(result: dict) -> str:
    chat = result.get("chat_protocol")
    if chat is None:
        return ""
    when = "" if chat["date"][:10] == result["date"][:10] else f", measured {chat['date'][:10]} on the same bundle files"
    return f" Chat: {chat['text']}{when}."


def render_markdown(result: dict, image_dir: str = "", title: bool = True, source: str | None = None) -> str:
    """bench.md: title, machine and protocol, the table, the computed claims, the plots (``image_dir``
    prefixes their paths), tool versions and build notes; ``source`` names the committed raw JSON it was
    rendered from. Labels and claims are computed here from the rows (``result`` is not changed)."""
    rows = copy.deepcopy(result["rows"])
    add_ratios(rows)
    for row in rows:
        row["qa_correct_text"], row["qa_kept_text"] = qa_cells(row)
    checks = claims(rows)
    columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)] or COLUMNS
    heading = f"{result['model']}: our bundles vs peer tools ({result['mode']} run, {result['date']})"
    lines = [f"# {heading}" if title else f"**{heading}.**", ""]
    if source is not None:
        lines += [f"Raw data: [`{source}`]({source}); this block is rendered from it by "
                  f"`python -m benchmarks.run --from-json {source} --readme README.md`.", ""]
    lines += [f"Machine: {result['machine'].get('cpu', result['machine']['machine'])}, {result['machine']['cpus']} "
              f"CPUs, {result['threads']} threads{_int8_flags_text(result['machine'])}; memory bandwidth "
              f"{result.get('bandwidth_gb_s', float('nan')):.1f} GB/s (same run). Perplexity: "
              f"{result['protocol']['perplexity']}. Speed: {result['protocol']['speed']}.{_chat_text(result)} "
              "(× dense) = ratio to the dense row of this run.", "",
              "| row | tool | " + " | ".join(c[0] for c in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [label_of(row), f"`{row['tool']}`"]
        for _, key, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("–")
                continue
            text = fmt.format(value)
            ratio = row.get("ratios", {}).get(key)
            if ratio is not None and row["name"] != "dense":
                text += f" ({ratio:.2f}×)"
            cells.append(text)
        if "error" in row:
            cells[0] += f" — **failed**: {row['error'].splitlines()[0][:120]}"
        elif "skipped" in row:
            cells[0] += f" — skipped: {row['skipped']}"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *render_claims(checks, rows)]
    lines += [f"![{name}]({image_dir}{name})" for name in result.get("plots", [])] + [""]
    lines += ["Tool versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", ""]
    notes = [f"- {r['name']}: {r['build']['note']}" for r in rows if r.get("build", {}).get("note")]
    if notes:
        lines += ["Build notes:", *notes, ""]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], lower_x: bool) -> list[int]:
    """Indices of the (x, perplexity) points on the front, sorted by x (x better when lower if ``lower_x``);
    :func:`benchmarks.pareto.pareto_front`'s strict rule."""
    costs = [(x if lower_x else -x, y) for x, y in points]
    return sorted(strict_front(costs), key=lambda i: points[i][0])


def plot(result: dict, out: Path) -> list[str]:
    """ppl vs KV bytes/token and ppl vs decode tok/s; one marker shape per tool, one colour per row,
    Pareto front dashed."""
    from qsvd_export.report import pyplot, save_png

    plt = pyplot()
    shapes = "os^vDP*Xph"
    tools = list(dict.fromkeys(r["tool"] for r in result["rows"]))
    written = []
    for x_key, x_label, lower_x, filename in [
        ("kv_bytes_per_token", "KV cache bytes / token (fp32 graph I/O)", True, "ppl_vs_kv.png"),
        ("decode_512_tok_s", "decode tokens/s @512 context", False, "ppl_vs_decode.png"),
    ]:
        rows = [r for r in result["rows"] if r.get(x_key) is not None and r.get("wiki_eval") is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        # a broken row (perplexity > 3× the best) would flatten the others: draw it on the cap, say so in the legend
        cap = 3 * min(r["wiki_eval"] for r in rows)
        for row in rows:
            off = row["wiki_eval"] > cap
            index = next(i for i, r in enumerate(result["rows"]) if r["name"] == row["name"])
            ax.scatter(row[x_key], min(row["wiki_eval"], cap), marker=shapes[tools.index(row["tool"]) % len(shapes)],
                       color=f"C{index % 10}", s=70, zorder=3, edgecolors="k" if row["family"] == "ours" else "none",
                       label=label_of(row) + (f" (ppl {row['wiki_eval']:.3g}, off scale)" if off else ""))
        points = [(r[x_key], r["wiki_eval"]) for r in rows]
        front = pareto_front(points, lower_x)
        ax.plot([points[i][0] for i in front], [min(points[i][1], cap) for i in front], "k--", lw=1, label="Pareto front",
                zorder=2)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"wiki_eval perplexity ({result['protocol']['windows']} × 512)")
        ax.set_title(f"{result['model']}, {result['date']} ({'lower-left' if lower_x else 'lower-right'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, out / filename, dpi=120)
        written.append(filename)
    return written


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    windows_count = args.windows or (4 if args.quick else 32)
    contexts = [512] if args.quick else [512, 2048]
    runs, new_tokens, rounds = (2, 32, 1) if args.quick else (5, 64, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "bundles"
    names = [n for n in ROW_NAMES if n not in set(args.skip)]
    result: dict[str, Any] = {
        "model": MODEL, "mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(), "versions": tool_versions(), "threads": args.threads,
        "protocol": {"windows": windows_count,
                     "perplexity": f"EVAL.md, {windows_count} × 512-token windows of {' and '.join(CORPORA)}, "
                                   "one prefill per window (DecoderRunner.window_nlls), CPU EP",
                     "speed": f"benchmarks.decode_speed, contexts {contexts}, medians of {runs} runs × "
                              f"{new_tokens} new tokens after a warm-up, {rounds} interleaved round(s), "
                              "one subprocess per bundle"},
        "rows": [],
    }
    from qsvd_export.bundle import load_bundle_config

    built: dict[str, Path] = {}
    windows = None
    for row in ROWS:
        if row.name not in names:
            continue
        entry: dict[str, Any] = {"name": row.name, "label": row.label, "tool": row.tool, "family": row.family}
        result["rows"].append(entry)
        try:
            print(f"[{time.perf_counter() - start:6.0f} s] {row.name}: build", flush=True)
            bundle, info = build_row(row.name, args, built)
            entry["build"] = info
            entry["label"] = label_of(entry)
            if bundle is None:
                entry["skipped"] = info["skipped"]
                continue
            entry["bundle"] = str(bundle)
            entry["build_s"] = info.get("build_s")
            if args.quick and not row.quick:
                built[row.name] = bundle
                entry["skipped"] = "measured in full mode only (--quick measures the rows built from it)"
                continue
            config = load_bundle_config(bundle)
            entry["graph_bytes"], entry["weight_bytes"] = bundle_sizes(bundle)
            entry["weight_mb"] = entry["weight_bytes"] / 1e6
            entry["static_shapes"] = bool(config.static_shapes)
            entry["r1"], entry["r2"] = compression_ratios(bundle, [built.get(PARENTS.get(row.name, ""))])
            if windows is None:
                windows = eval_windows(bundle, windows_count)
            print(f"[{time.perf_counter() - start:6.0f} s] {row.name}: perplexity", flush=True)
            entry.update(measure_quality(bundle, windows, args.threads))
            built[row.name] = bundle
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, the others still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
            print(f"  {row.name} failed: {entry['error'][:300]}", flush=True)
    if args.chat_rows:
        print(f"[{time.perf_counter() - start:6.0f} s] chat quality of {', '.join(args.chat_rows)}", flush=True)
        try:
            add_chat(result, args.chat_rows, args.out / "chat_quality.json", args.threads,
                     *((4, 4) if args.quick else (None, None)))
        except Exception as exc:  # noqa: BLE001 - reported; the speed step still runs
            result["chat_error"] = f"{type(exc).__name__}: {exc}"
            print(f"  chat quality failed: {result['chat_error'][:300]}", flush=True)
    measured = [r for r in result["rows"] if r["name"] in built and "skipped" not in r and not r.get("static_shapes")]
    if measured:
        print(f"[{time.perf_counter() - start:6.0f} s] decode speed of {len(measured)} bundles", flush=True)
        try:
            speed = measure_speed([Path(r["bundle"]) for r in measured], contexts, runs, new_tokens, rounds,
                                  args.threads, args.out / "decode_speed.json")
            result["bandwidth_gb_s"] = speed["bandwidth_gb_s"]
            for entry, row in zip(measured, speed["rows"]):
                for key, value in row.items():
                    if key.startswith(("decode_", "prefill_", "peak_rss", "roofline_", "achieved_")):
                        entry[key] = value
        except subprocess.CalledProcessError as exc:
            result["speed_error"] = exc.stderr[-3000:]
            print(f"  decode speed failed: {exc.stderr[-1000:]}", flush=True)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - start, 1)
    render(result, args.out)
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}, {', '.join(result['plots'])} "
          f"in {result['wall_s']:.0f} s")
    return result


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def publish(result: dict, out: Path, readme: Path, source: str | None = None) -> None:
    """Put this run's table, claims and plots into ``readme`` between its bench markers; the plots are
    copied to ``docs/bench/`` beside it. ``source``: the committed raw JSON the block names (its path
    relative to the README's folder)."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_START} … {README_END} block to fill")
    images = readme.parent / "docs" / "bench"
    images.mkdir(parents=True, exist_ok=True)
    for name in result["plots"]:
        shutil.copy2(out / name, images / name)
    block = render_markdown(result, image_dir="docs/bench/", title=False, source=source)
    head, rest = text.split(README_START, 1)
    readme.write_text(f"{head}{README_START}\n{block}\n{README_END}{rest.split(README_END, 1)[1]}")


def readme_blocks(text: str) -> list[tuple[str | None, str]]:
    """Each bench block of a README: (the raw JSON it names, or None; the block's text between the markers)."""
    blocks = []
    for part in text.split(README_START)[1:]:
        block = part.split(README_END, 1)[0].removeprefix("\n").removesuffix("\n")
        named = [line.split("`", 2)[1] for line in block.splitlines() if line.startswith("Raw data: [`")]
        blocks.append((named[0] if named else None, block))
    return blocks


def render(result: dict, out: Path) -> None:
    """Claims, bench.md, the plots and bench.json from a run's figures (also ``--render-only``)."""
    add_ratios(result["rows"])
    result["claims"] = claims(result["rows"])
    result["plots"] = plot(result, out)
    markdown = render_markdown(result)
    (out / "bench.md").write_text(markdown)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="4 perplexity windows per corpus, decode @512 only, 2 runs × 32 tokens; no torch-stage builds; "
                             "the fp32 latent row is only a source there")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--work", type=Path, default=None, help="where built bundles go (default OUT/bundles)")
    parser.add_argument("--dense", type=Path, default=None, help="existing dense bundle of smollm2-135m")
    parser.add_argument("--ours-w4a8", type=Path, default=None, help="existing `export --target cpu` bundle")
    parser.add_argument("--ours-latent", type=Path, default=None, help="existing `compress --budget kv=0.5` bundle")
    parser.add_argument("--skip", nargs="*", default=[], choices=ROW_NAMES, help="rows to leave out")
    parser.add_argument("--windows", type=int, default=None, help="perplexity windows (default 32; --quick 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true", help="rebuild bundles an earlier run left in --work")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also write the table, claims and plots into this README's bench block "
                             "(plots copied to docs/bench/ beside it)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: redraw OUT/bench.md and the plots from OUT/bench.json")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render the table, checks and plots from this committed raw JSON "
                             "(with --readme: the README block names it, and a test compares the two)")
    parser.add_argument("--chat-rows", nargs="*", default=list(DEFAULT_CHAT_ROWS), choices=ROW_NAMES,
                        help="rows whose chat quality is measured against dense (none: leave the columns out)")
    parser.add_argument("--measure-chat", action="store_true",
                        help="with --from-json: measure the chat columns of --chat-rows on that run's bundles "
                             "(their sizes are checked against the run's record) and write OUT/bench.json")
    args = parser.parse_args(argv)
    if args.measure_chat and args.from_json is None:
        parser.error("--measure-chat needs --from-json (a full run measures chat itself)")
    return args


def main(argv: list[str] | None = None) -> None:
    from qsvd_export.progress import set_mode

    set_mode("quiet")  # the npu builders' bars would interleave with the run's own log
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    source = args.from_json or (args.out / "bench.json" if args.render_only else None)
    if source is not None:
        if not source.is_file():
            raise SystemExit(f"benchmarks.run: error: {source} is not a file")
        result = json.loads(source.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        if args.measure_chat:
            try:
                add_chat(result, args.chat_rows, args.out / "chat_quality.json", args.threads, verify_sizes=True)
            except ValueError as exc:
                raise SystemExit(f"benchmarks.run: error: {exc}") from None
        render(result, args.out)
    else:
        result = run(args)
    if args.readme is not None:
        named = None
        if args.from_json is not None:
            try:
                named = args.from_json.resolve().relative_to(args.readme.resolve().parent).as_posix()
            except ValueError:
                raise SystemExit(f"benchmarks.run: error: {args.from_json} is not inside {args.readme.parent}: "
                                 "the README can only cite a committed file of its repository") from None
        publish(result, args.out, args.readme, source=named)


if __name__ == "__main__":
    main()
