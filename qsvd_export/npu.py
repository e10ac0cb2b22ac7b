"""The ``npu`` target: static prefill/decode graphs with QDQ for Qualcomm QNN HTP.

From the dynamic float decoder graph (after the graph stage, dense or latent cache):
1. ``static_shapes``: a prefill graph (``prefill_length`` tokens) and a decode graph (1 token), both over
   a right-aligned cache window of ``context_length`` slots;
2. ``low_precision``: RMSNorm → SimplifiedLayerNormalization, mask constants clamped to ±``mask_value``;
3. calibration feeds made by running the *float* static graphs on ``wiki_calib`` text (first prefill
   chunks with an empty cache, second chunks and decode steps with the cache the float graphs built);
4. QDQ insertion with ONNX Runtime's QNN recipe (``get_qnn_qdq_config``: per-op rules, shared scales for
   data movement, 16-bit fixed scales for Sigmoid/Tanh): activations per-tensor uint16 (static,
   calibrated; ``a8`` presets: uint8 where the normalized stream enters q/k/v and the MLP gate, and at
   those MatMuls' outputs), MatMul weights symmetric per-output-channel int8;
5. one ``weights.data`` for both graphs, a check of every node against the HTP op set
   (:func:`npu_violations`), and, when ``onnxruntime-qnn`` is installed, a QNN HTP session per graph with
   CPU fallback disabled plus a prefill window and greedy steps compared with the CPU EP.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qsvd_export.activation_ranges import METHODS as _CALIBRATION_METHODS
from qsvd_export.bundle import GraphSpec, LayerCache
from qsvd_export.errors import RuntimeFailure, UsageError
from qsvd_export.quantize import Bits

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

    def check(self) -> None:
        if not 1 < self.prefill_length < self.context_length:
            raise UsageError(f"--prefill-length must be in (1, context length {self.context_length})")
        if self.int4_block < 0 or self.int4_block % 16:
            raise UsageError(f"--int4-block must be 0 (per channel) or a positive multiple of 16, not {self.int4_block}")
        if self.weight_clip not in ("mse", "none"):
            raise UsageError(f"unknown weight clip '{self.weight_clip}' (mse or none)")
        if self.calibration_method not in _CALIBRATION_METHODS:
            raise UsageError(f"unknown calibration method '{self.calibration_method}' "
                             f"(choose from {', '.join(_CALIBRATION_METHODS)})")
        if self.precompile:
            _require_qnn("--precompile")  # before any slow step


GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
_ACTIVATIONS = frozenset({"Sigmoid", "Gelu", "Tanh", "Relu", "Erf", "Softplus", "FastGelu"})
CONTEXT_FILES = {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}  # + <name>_qnn.bin each


def static_float_graphs(dynamic_path: Path, work: Path, options: NpuOptions) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write ``prefill`` and ``decode`` float static graphs into ``work``; returns paths and what was done."""
    from qsvd_export.passes.low_precision import fuse_norms_and_clamp_masks
    from qsvd_export.passes.rotary_tables import tabulate_rotary
    from qsvd_export.passes.static_shapes import specialize_decoder

    paths, report = {}, {}
    for role, seq in (("prefill", options.prefill_length), ("decode", 1)):
        model = ir.load(dynamic_path)
        specialize_decoder(model, seq, options.context_length)
        report[role] = {**fuse_norms_and_clamp_masks(model, options.mask_value).as_dict(),
                        **tabulate_rotary(model, options.context_length)}
        paths[role] = work / f"{role}_float.onnx"
        ir.save(model, paths[role], external_data=f"{role}_float.onnx.data")
        del model
    return paths, report


def calibration_feeds(float_paths: dict[str, Path], cache: list[LayerCache], windows: np.ndarray,
                      options: NpuOptions) -> dict[str, list[dict[str, np.ndarray]]]:
    """Graph inputs for calibration: per window of 2·prefill + decode_steps tokens, two prefill feeds
    (empty cache, then the cache the float graphs built) and ``decode_steps`` decode feeds."""
    from qsvd_export.runtimes.static_decode import StaticDecoder

    decoder = StaticDecoder.from_files(float_paths["prefill"], float_paths["decode"], cache,
                                       options.context_length, options.prefill_length)
    from qsvd_export.progress import bar

    size = options.prefill_length
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"prefill": [], "decode": []}
    progress = bar(len(windows), "npu calibration feeds (float static graphs)")
    for row in windows:
        tokens = [int(t) for t in row]
        state = decoder.empty_state()
        for role, chunk in [("prefill", tokens[:size]), ("prefill", tokens[size:2 * size]),
                            *(("decode", [t]) for t in tokens[2 * size:2 * size + options.calibration_decode_steps])]:
            _, state, feed = decoder.step_with_feed(state, chunk)
            feeds[role].append(feed)
        progress.update()
    progress.close()
    return feeds


def calibration_windows(tokenizer: Any, options: NpuOptions) -> np.ndarray:
    """``calibration_windows`` rows of wiki_calib tokens, each long enough for :func:`calibration_feeds`."""
    from qsvd_export.data import read_text, token_windows

    span = 2 * options.prefill_length + options.calibration_decode_steps
    return token_windows(tokenizer, read_text("wiki_calib"), span, options.calibration_windows, source="wiki_calib")


class FeedReader:
    """onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]


def _tensor_overrides(float_path: Path, weight: Any, matmul_inputs: Any | None,
                      clips: dict[str, np.ndarray] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Tensor overrides for the QNN recipe.

    - Every 2-D initializer a MatMul reads as its weight [K, N]: symmetric per-output-channel scales
      (axis 1). The recipe's default is per-tensor for MatMul, which on smollm2 alone costs 7% perplexity
      at int8; QNN HTP compiles the per-channel form (checked in tests). With ``clips`` ({weight name:
      per-channel clip}, :func:`qsvd_export.weight_ranges.weight_clips`) a channel's range is its clip
      instead of its absolute maximum.
    - ``matmul_inputs`` (the ``a8`` presets): where a MatMul reads the RMSNorm output (q/k/v, MLP gate:
      41% of smollm2's weight MACs) its input is converted to that type for the MatMul only (a QNN
      Convert; RmsNorm must output its input's type) and its output uses that type too (QNN's quantized
      MatMul takes one activation width in and out). The GLU value branch (up_proj: an expanding
      MatMul whose output feeds no activation) stays 16-bit: its output carries the MLP's massive
      outliers (smollm2 with H1: 1.64x with it at 8 bits, 1.026x without). Every other activation keeps
      16 bits: the residual stream (massive per-token outliers that no rotation removes), the attention
      core and the o_proj/down_proj outputs that write into the residual (smollm2: ppl > 1e6 with
      everything at 8 bits, even with the residual or the attention core left in float).
    - With int4 weights the MatMul that writes a graph output (an untied lm_head) keeps int8 weights, as
      on the cpu target (smollm2 with H1, w4a16: 1.63x dense with an int4 head)."""
    import onnx
    from onnxruntime.quantization import QuantType

    from qsvd_export.passes.rotary_tables import TABLE_SUFFIX

    proto = onnx.load(float_path, load_external_data=False)
    if any(not node.name for node in proto.graph.node):
        raise RuntimeFailure("QDQ overrides need named nodes; the static graph has unnamed ones")
    matrices = {i.name for i in proto.graph.initializer if len(i.dims) == 2}
    overrides: dict[str, list[dict[str, Any]]] = {}
    readers: dict[str, set[str]] = {}
    producers = {output: node for node in proto.graph.node for output in node.output}
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    for name in shapes:
        if name.endswith(TABLE_SUFFIX):  # rotary cos/sin tables: 16-bit like the activations they replace
            overrides[name] = [{"quant_type": QuantType.QUInt16}]
    graph_outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in matrices:
            head = node.output[0] in graph_outputs and weight == QuantType.QInt4
            overrides[node.input[1]] = [{"quant_type": QuantType.QInt8 if head else weight, "symmetric": True, "axis": 1}]
            if clips is not None and node.input[1] in clips and not head:
                overrides[node.input[1]] = _clipped_channels(overrides[node.input[1]][0], clips[node.input[1]])
            source = producers.get(node.input[0])
            reads_norm = source is not None and source.op_type == "SimplifiedLayerNormalization"
            k, n = shapes[node.input[1]]
            glu_value = n > k and not set(consumers.get(node.output[0], [])) & _ACTIVATIONS
            if matmul_inputs is not None and reads_norm and not glu_value:
                readers.setdefault(node.input[0], set()).add(node.name)
                overrides[node.output[0]] = [{"quant_type": matmul_inputs}]
    for tensor, nodes in readers.items():
        overrides[tensor] = [{"quant_type": QuantType.QUInt16,
                              "convert": {"quant_type": matmul_inputs, "recv_nodes": nodes}}]
    return overrides


def _clipped_channels(first: dict[str, Any], clip: np.ndarray) -> list[dict[str, Any]]:
    """Per-channel overrides with channel n's range [-clip[n], clip[n]]."""
    channels = [{"rmin": np.float32(-c), "rmax": np.float32(c)} for c in clip]
    channels[0] = {**first, **channels[0]}
    return channels


def insert_qdq(float_path: Path, out_path: Path, bits: Bits, feeds: list[dict[str, np.ndarray]],
               method: str, clips: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Calibrate activation ranges on ``feeds`` and write the QDQ graph (external data) to ``out_path``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from qsvd_export.activation_ranges import clipped_ranges

    matmul_inputs = {16: None, 8: QuantType.QUInt8}[bits.activations or 16]
    weight = {8: QuantType.QInt8, 4: QuantType.QInt4}[bits.weights or 8]
    overrides = _tensor_overrides(float_path, weight, matmul_inputs, clips)
    # the 8-bit activations (a8 presets): the tensors a calibration method other than min/max clips
    low_bit = {name: (entry[0]["convert"] if "convert" in entry[0] else entry[0])
               for name, entry in overrides.items()
               if (entry[0].get("convert") or entry[0]).get("quant_type") == QuantType.QUInt8}
    ranges = clipped_ranges(float_path, feeds, {name: 8 for name in low_bit}, method)
    for name, (rmin, rmax) in ranges.items():
        low_bit[name].update(rmin=np.float32(rmin), rmax=np.float32(rmax))
    config = get_qnn_qdq_config(str(float_path), FeedReader(feeds), calibrate_method=CalibrationMethod.MinMax,
                                activation_type=QuantType.QUInt16, weight_type=weight, weight_symmetric=True,
                                init_overrides=overrides)
    config.use_external_data_format = True
    ort.set_default_logger_severity(3)  # the quantizer's sessions warn about every unused initializer
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # and it logs a pre-processing hint through the root logger
    try:
        quantize(str(float_path), str(out_path), config)
    finally:
        root.setLevel(level)
    activations = ("QUInt16" if matmul_inputs is None
                   else "QUInt8 in/out of the MatMuls reading the norm (q/k/v, MLP gate), QUInt16 elsewhere")
    clip = ", MSE-clipped ranges" if clips is not None else ""
    return {"activations": activations, "weights": f"{weight.name} symmetric per output channel (MatMul){clip}",
            "calibration": {"method": method, "feeds": len(feeds), "clipped_tensors": len(ranges)}}


SHARED_DATA = "weights.data"


def save_sharing_weights(sources: dict[str, Path], folder: Path, data_name: str = SHARED_DATA) -> dict[str, Any]:
    """Write each graph in ``sources`` to ``folder/<role>.onnx`` with all initializers of 1 KiB or more in
    one ``data_name`` file; an initializer both graphs hold with the same name and bytes (the quantized
    weights: their scales come from the weights alone) is stored once. Returns byte counts."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    stored: dict[tuple[str, str], tuple[int, int]] = {}
    written = shared = 0
    with open(folder / data_name, "wb") as data:
        for role, source in sources.items():
            proto = onnx.load(source, load_external_data=True)
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < 1024:
                    continue
                key = (tensor.name, hashlib.sha256(raw).hexdigest())
                if key in stored:
                    shared += len(raw)
                else:
                    pad = -data.tell() % 4096  # page-aligned, so runtimes can memory-map tensors
                    data.write(b"\0" * pad)
                    stored[key] = (data.tell(), len(raw))
                    data.write(raw)
                    written += len(raw)
                offset, length = stored[key]
                set_external_data(tensor, data_name, offset, length)
                tensor.ClearField("raw_data")
            onnx.save(proto, folder / GRAPH_FILES[role])
            del proto
    return {"weight_file": data_name, "bytes_written": written, "bytes_shared": shared}


def build_npu_graphs(dynamic_path: Path, folder: Path, cache: list[LayerCache], bits: Bits, tokenizer: Any,
                     options: NpuOptions) -> tuple[list[GraphSpec], dict[str, Any]]:
    """Write ``prefill.onnx`` and ``decode.onnx`` (QDQ) and their shared ``weights.data`` into ``folder``.

    The report's ``timings`` entry holds wall times (kept out of ``report.json`` by the caller)."""
    from qsvd_export.passes.npu_legalize import npu_violations
    from qsvd_export.progress import bar, info
    from qsvd_export.targets import policy_for

    options.check()
    policy_for("npu").bits(bits.name)  # the npu presets (UsageError otherwise)
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
            from qsvd_export.weight_ranges import input_second_moments, matmul_weights

            info(f"npu: int4 weights in LPBQ blocks of {options.int4_block} (per-block scale search)")
            role_weights = {"prefill": matmul_weights(float_paths["prefill"])}
            row_weights = input_second_moments(float_paths["prefill"], feeds["prefill"], role_weights["prefill"])
        elif options.weight_clip == "mse":
            from qsvd_export.weight_ranges import weight_clips

            info("npu: per-channel weight clips (MSE search)")
            clips = weight_clips(float_paths["prefill"], feeds["prefill"], bits.weights or 8)
        progress = bar(len(GRAPH_FILES), "npu activation ranges + QDQ (prefill, decode)")
        for role, filename in GRAPH_FILES.items():
            info(f"npu: QDQ {bits.name} for the {role} graph ({len(feeds[role])} calibration feeds)")
            start = time.perf_counter()
            qdq_paths[role] = work / filename
            qdq = insert_qdq(float_paths[role], qdq_paths[role], bits, feeds[role], options.calibration_method, clips)
            if blocks:
                weights = role_weights.pop(role, None) or matmul_weights(float_paths[role])
                qdq_paths[role] = _blockwise_int4(qdq_paths[role], weights, options.int4_block, row_weights, qdq)
                del weights
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


def _blockwise_int4(qdq_path: Path, weights: dict[str, Any], block: int, row_weights: dict[str, np.ndarray],
                    qdq_report: dict[str, Any]) -> Path:
    """The QDQ graph with its int4 MatMul weights (``weights``: the float graph's
    :class:`~qsvd_export.weight_ranges.MatMulWeight` per MatMul node) in LPBQ blocks
    (:mod:`qsvd_export.block_weights`); updates ``qdq_report``'s weight description. Returns the new path."""
    from qsvd_export.block_weights import rewrite_as_lpbq

    out_path = qdq_path.with_name(f"{qdq_path.stem}_lpbq.onnx")
    counts = rewrite_as_lpbq(qdq_path, out_path, {node: w.array for node, w in weights.items()}, block, row_weights)
    qdq_report["weights"] = (f"int4 LPBQ: blocks of {block} input channels, 4-bit block scale codes x a float "
                             "scale per output channel, per-block code search weighted by E[x^2]")
    qdq_report["weight_blocks"] = counts
    return out_path


def _require_qnn(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        raise RuntimeFailure(f"{what} needs the QNN execution provider; fix: pip install 'qsvd-export[npu]'")


def precompile_contexts(folder: Path, options: NpuOptions) -> dict[str, Any]:
    """Compile both QDQ graphs on QNN HTP (CPU fallback disabled) and write EPContext models
    (``prefill_ctx.onnx`` + ``prefill_ctx_qnn.bin``, same for decode): a device loads the binary
    instead of compiling at start-up. Returns {role: context model file} and the compile times."""
    from qsvd_export.runtimes.sessions import SessionOptions, create_session

    _require_qnn("--precompile")
    files, timings = {}, {}
    for role, filename in GRAPH_FILES.items():
        start = time.perf_counter()
        config = {"ep.context_enable": "1", "ep.context_file_path": str(folder / CONTEXT_FILES[role]),
                  "ep.context_embed_mode": "0"}
        try:
            create_session(folder / filename, "npu", SessionOptions(strict=True, htp_arch=options.htp_arch,
                                                                    extra_config=config))
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"QNN HTP (htp_arch {options.htp_arch}) could not compile {filename}: {exc}") from None
        if not (folder / CONTEXT_FILES[role]).is_file():
            raise RuntimeFailure(f"QNN EP wrote no context model for {filename}")
        files[role] = CONTEXT_FILES[role]
        timings[f"qnn_{role}_context_s"] = round(time.perf_counter() - start, 1)
    return {"files": files, "timings": timings}


def _greedy_after_window(decoder: Any, window: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Prefill one full window, then ``steps`` greedy tokens; returns the window's logits and the tokens."""
    logits, state = decoder.step(decoder.empty_state(), window)
    window_logits, tokens = logits, []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        if len(tokens) < steps:
            logits, state = decoder.step(state, [tokens[-1]])
    return window_logits, tokens


DECISIVE_MARGIN = 1.0  # logits: a top-1 lead no rounding difference between two backends should overturn


def decisive_agreement(logits: np.ndarray, reference: np.ndarray, margin: float = DECISIVE_MARGIN) -> dict[str, Any]:
    """Argmax agreement of ``logits`` [n, vocab] with ``reference`` at the positions where the reference's
    top-1 leads its top-2 by at least ``margin``: near-ties flip under any rounding change, a decisive
    position that flips means one backend computes something else. Returns the rate and the count."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= margin
    same = logits.argmax(-1) == reference.argmax(-1)
    if not decisive.any():  # no evidence either way: undefined, not 100%
        return {"decisive_positions": 0, "decisive_argmax_agreement": None,
                "decisive_note": f"undefined: no position where the reference's top-1 leads by >= {margin} logit"}
    return {"decisive_positions": int(decisive.sum()),
            "decisive_argmax_agreement": round(float(np.mean(same[decisive])), 4)}


def decisive_text(check: dict[str, Any]) -> str:
    """The decisive agreement in words, e.g. "97.5% at the 80 positions the CPU EP decides by >= 1 logit";
    "undefined" when there were none (never read as 100%)."""
    if check.get("decisive_argmax_agreement") is None:
        return f"undefined at decisive positions (none: the CPU EP led by >= {DECISIVE_MARGIN:g} logit nowhere)"
    return (f"{check['decisive_argmax_agreement']:.1%} at the {check['decisive_positions']} positions the CPU EP "
            f"decides by >= {DECISIVE_MARGIN:g} logit")


EP_ASSIGNMENT_CONFIG = "session.record_ep_graph_assignment_info"


def ep_placement(session: Any) -> dict[str, int] | None:
    """Nodes per execution provider as onnxruntime assigned them in ``session`` (created with
    :data:`EP_ASSIGNMENT_CONFIG` = "1"); None when this onnxruntime does not expose the assignment."""
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        return None
    try:
        subgraphs = getter()
    except Exception:  # noqa: BLE001 - an onnxruntime without the recording raises a plain error
        return None
    counts: dict[str, int] = {}
    for subgraph in subgraphs:
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return dict(sorted(counts.items())) or None


def qnn_placement(sessions: dict[str, Any], graph_nodes: dict[str, int]) -> dict[str, Any]:
    """Where the nodes of each graph run: from onnxruntime's own EP assignment when it exposes it (per
    graph, nodes per provider, ``nodes_on_cpu`` counted from it); otherwise inferred, saying so: the
    sessions were created with CPU fallback disabled, so all ``graph_nodes`` must be on QNN HTP."""
    placed = {role: ep_placement(session) for role, session in sessions.items()}
    if all(counts is not None for counts in placed.values()):
        return {"placement": placed, "placement_source": "onnxruntime get_provider_graph_assignment_info",
                "nodes_on_cpu": sum(c.get("CPUExecutionProvider", 0) for c in placed.values())}
    return {"placement": {role: {"QNNExecutionProvider": count} for role, count in graph_nodes.items()},
            "placement_source": "inferred, not read from the EP: onnxruntime exposes no assignment here; the "
                                "sessions were created with CPU fallback disabled, so all nodes are on QNN HTP",
            "nodes_on_cpu": None}


def verify_on_qnn(folder: Path, cache: list[LayerCache], tokenizer: Any, options: NpuOptions,
                  contexts: dict[str, str] | None = None) -> dict[str, Any]:
    """QNN HTP sessions (CPU fallback disabled) for both graphs — from the context binaries when
    ``contexts`` names them; one prefill window of ``wiki_eval`` and ``verify_tokens`` greedy decode steps
    on HTP and on the CPU EP (same QDQ graphs): per-position argmax agreement and max |Δlogit| over the
    window, and whether the greedy tokens match."""
    import importlib.util

    from qsvd_export.data import read_text, token_windows
    from qsvd_export.runtimes.sessions import SessionOptions
    from qsvd_export.runtimes.static_decode import StaticDecoder

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return {"qnn": "skipped: onnxruntime-qnn is not installed (pip install 'qsvd-export[npu]')"}
    paths = [folder / GRAPH_FILES["prefill"], folder / GRAPH_FILES["decode"]]
    npu_paths = [folder / contexts[role] for role in GRAPH_FILES] if contexts else paths
    start = time.perf_counter()
    try:
        npu = StaticDecoder.from_files(*npu_paths, cache, options.context_length, options.prefill_length, "npu",
                                       SessionOptions(strict=True, htp_arch=options.htp_arch,
                                                      extra_config={EP_ASSIGNMENT_CONFIG: "1"}))
    except RuntimeFailure as exc:
        raise RuntimeFailure(f"QNN HTP (htp_arch {options.htp_arch}, CPU fallback disabled) refused the graphs: {exc}") from None
    compile_s = time.perf_counter() - start
    cpu = StaticDecoder.from_files(*paths, cache, options.context_length, options.prefill_length, "cpu")
    window = [int(t) for t in token_windows(tokenizer, read_text("wiki_eval"), options.prefill_length, 1,
                                            source="wiki_eval")[0]]
    start = time.perf_counter()
    npu_logits, npu_tokens = _greedy_after_window(npu, window, options.verify_tokens)
    run_s = time.perf_counter() - start
    cpu_logits, cpu_tokens = _greedy_after_window(cpu, window, options.verify_tokens)
    import onnx

    roles = {options.prefill_length: "prefill", 1: "decode"}
    graph_nodes = {role: len(onnx.load(str(path), load_external_data=False).graph.node)
                   for role, path in zip(GRAPH_FILES, npu_paths)}
    return {
        "qnn": "loaded from context binaries" if contexts else "compiled", "htp_arch": options.htp_arch,
        "cpu_fallback": "disabled",
        **qnn_placement({roles[length]: session for length, session in npu.sessions.items()}, graph_nodes),
        "timings": {"qnn_session_s": round(compile_s, 1), "qnn_run_s": round(run_s, 1)},
        "window": f"first {options.prefill_length} tokens of wiki_eval",
        "argmax_agreement": round(float(np.mean(npu_logits.argmax(-1) == cpu_logits.argmax(-1))), 4),
        **decisive_agreement(npu_logits, cpu_logits),
        "max_abs_logit_diff": round(float(np.abs(npu_logits - cpu_logits).max()), 4),
        "median_abs_logit_diff": round(float(np.median(np.abs(npu_logits - cpu_logits))), 4),
        "tokens_npu": npu_tokens, "tokens_cpu": cpu_tokens, "tokens_match": npu_tokens == cpu_tokens,
    }


def finish_npu_bundle(folder: Path, config: Any, target_report: dict[str, Any], strict: bool, tokenizer: Any,
                      options: NpuOptions | None, verify: bool, timings: dict[str, float]) -> dict[str, Any]:
    """Turn a bundle folder holding the dynamic ``model.onnx`` into an npu bundle: static QDQ graphs and
    ``weights.data`` replace it, ``qsvd_config.json`` gets ``static_shapes``, then optional context
    binaries and the QNN check. Returns the target report; wall times go to ``timings``."""
    from qsvd_export.bundle import CONFIG_NAME
    from qsvd_export.errors import UnsupportedModelError
    from qsvd_export.progress import info
    from qsvd_export.quantize import parse_bits

    if config.kind != "decoder":
        raise UnsupportedModelError(f"target npu builds static decoder graphs; this is a {config.kind} model")
    options = options or NpuOptions()
    dynamic = folder / "model.onnx"
    specs, npu_report = build_npu_graphs(dynamic, folder, config.cache, parse_bits(target_report["bits"]),
                                         tokenizer, options)
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
