"""``README.md`` for a static (npu) bundle: what the receiving engineer needs to drive the graphs.

Rendered from ``qsvd_config.json`` and the target report only, so it is as deterministic as they are.
"""

from __future__ import annotations

from typing import Any

from qsvd_export.bundle import BundleConfig


def _cache_lines(config: BundleConfig, context: int, prefill: int) -> list[str]:
    layer = config.cache[0]  # shapes of layer 0; the layer list below says which layers differ in kind
    lines = []
    for tensor in layer.tensors:
        shape = ", ".join("1" if d == "batch_size" else "P" if d == "past_sequence_length" else str(d)
                          for d in tensor.shape)
        part = tensor.input.rsplit(".", 1)[-1]
        lines.append(f"- `past_key_values.{{i}}.{part}` float32 [{shape}] → `present.{{i}}.{part}` "
                     f"(sequence axis {tensor.sequence_axis})")
    kinds = sorted({f"{la.kind}{f' r={la.rank}' if la.rank else ''}" for la in config.cache})
    lines.append(f"- {len(config.cache)} layers: {', '.join(kinds)}. P = {context - prefill} for prefill, "
                 f"{context - 1} for decode; every `present.*` has {context} slots.")
    return lines


def render_npu_readme(config: BundleConfig, target: dict[str, Any]) -> str:
    static = config.static_shapes
    context, prefill = int(static["context_length"]), int(static["prefill_length"])
    check = target.get("verification", {})
    lines = [
        f"# {config.model_name} for Qualcomm QNN HTP ({target['bits']})",
        "",
        "Two static ONNX graphs (opset 21, QuantizeLinear/DequantizeLinear inside, float32 I/O) that share",
        "`weights.data`:",
        "",
        f"- `prefill.onnx`: {prefill} new tokens per call; `decode.onnx`: 1 new token per call.",
        f"- Cache window: {context} slots, right-aligned (newest token in the last slot), unused slots zero.",
    ]
    if static.get("qnn_context_models"):
        files = ", ".join(f"`{f}`" for f in static["qnn_context_models"].values())
        lines.append(f"- Precompiled QNN context models (htp_arch {static.get('htp_arch')}): {files} with their "
                     "`_qnn.bin` binaries; load them with the QNN EP instead of the `.onnx` graphs to skip compiling.")
    lines += [
        "",
        "## Inputs and outputs (batch 1)",
        "",
        f"- `input_ids` int64 [1, S], `position_ids` int64 [1, S] (S = {prefill} or 1)",
        f"- `attention_mask` int64 [1, {context}]: 1 for slots holding a real token (past and new), else 0",
        *_cache_lines(config, context, prefill),
        "- `logits` float32 [1, S, vocab]",
        "",
        "## Driving it",
        "",
        "1. Start with all cache tensors zero and an all-zero slot mask of length "
        f"{context}.",
        f"2. Prompt: split into chunks of {prefill}; left-pad the *first* chunk with token 0 at position 0 and",
        "   mask 0 (real tokens must stay contiguous). For each chunk: past = the last "
        f"{context - prefill} slots of",
        "   each cache tensor (along its sequence axis); attention_mask = the last "
        f"{context - prefill} slot flags",
        "   followed by the chunk's flags; position_ids = 0, 1, 2, … over real tokens. Run `prefill.onnx`;",
        "   the outputs `present.*` become the cache, the mask you passed becomes the slot flags.",
        f"3. Decode: the same with one token, past = the last {context - 1} slots, `decode.onnx`.",
        "   Next token = argmax of the last logits row (greedy).",
        f"4. The window holds {context} tokens in total; stop (or start a new window) before that.",
        "",
        "A reference loop is `qsvd_export/runtimes/static_decode.py` (`StaticDecoder`) in qsvd-export.",
        "",
        "## Numbers from report.json",
        "",
        f"- Quantization: activations {target['graphs']['prefill']['activations']}; weights "
        f"{target['graphs']['prefill']['weights']}.",
    ]
    if check.get("qnn", "").startswith("skipped") or not check:
        lines.append("- QNN HTP check: not run when this bundle was built.")
    else:
        lines.append(f"- QNN HTP (htp_arch {check['htp_arch']}, CPU fallback disabled): {check['qnn']}; argmax "
                     f"agreement with the CPU EP {check['argmax_agreement']:.1%} over {check['window']}, "
                     f"max |Δlogit| {check['max_abs_logit_diff']}, greedy tokens "
                     f"{'identical' if check['tokens_match'] else 'different'}.")
    return "\n".join(lines) + "\n"
