"""``README.md`` of every bundle: what the receiving engineer needs to drive the graphs.

Rendered from ``qsvd_config.json`` and ``report.json`` only, so it is as deterministic as they are.
Static (npu) decoder bundles get the window protocol; dynamic decoder bundles the prefill/decode loop
over a growing dense or latent cache; encoder and vision bundles their inputs and outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qsvd_export.bundle import CONFIG_NAME, BundleConfig, load_bundle_config

README = "README.md"


def write_readme(folder: Path) -> None:
    """Render ``folder``'s README.md from its config and report (call after both are final)."""
    config = load_bundle_config(folder)
    report = json.loads((folder / "report.json").read_text())
    if config.static_shapes:
        text = render_npu_readme(config, report["target"])
    elif config.kind == "decoder":
        text = render_decoder_readme(config, report)
    elif config.kind == "vlm":
        text = render_vlm_readme(config, report)
    else:
        text = render_encoder_readme(config, report)
    (folder / README).write_text(text)


def _files(config: BundleConfig) -> list[str]:
    lines = []
    for spec in config.graphs:
        ort = f" (also `{spec.ort_filename}`, ORT format for mobile builds)" if spec.ort_filename else ""
        lines.append(f"- `{spec.filename}` + `{spec.filename}.data` (weights){ort}")
    if any(spec.ort_filename for spec in config.graphs):
        lines.append("- `required_operators.config`: the operators (with types) for a reduced onnxruntime build")
    if config.tokenizer_files:
        lines.append(f"- tokenizer: {', '.join(f'`{f}`' for f in config.tokenizer_files)}")
    lines.append(f"- `{CONFIG_NAME}`: the runtime contract (graph I/O, cache layout, generation defaults); "
                 "`report.json`: how it was built and measured")
    return lines


def _numbers(report: dict[str, Any]) -> list[str]:
    sink = ((report.get("target") or {}).get("latent_cache") or {}).get("sink_bytes")
    lines = [f"- weights on disk {report['weight_bytes'] / 1e6:.1f} MB; cache {report['kv_bytes_per_token']:,} "
             "bytes per token (all layers)" + (f" + {sink:,} bytes once (the first token, exact)" if sink else "")]
    if "r1" in report:
        lines.append(f"- QSVD: R1 {report['r1']:.3f} (attention parameters kept), R2 {report['r2']:.3f} "
                     "(cache kept), ranks per layer in `report.json` → `layers`")
    target = report.get("target")
    if target:
        lines.append(f"- target {target['target']}, preset {target['bits']}"
                     + (f", {target['quantized_matmuls']} MatMuls as MatMulNBits" if target.get("quantized_matmuls")
                        else ""))
    ppl = report.get("perplexity")
    if isinstance(ppl, dict) and "compressed_onnx" in ppl:
        lines.append(f"- perplexity on {ppl['text']} ({ppl['windows']} × {ppl['length']} tokens): "
                     f"{ppl['compressed_onnx']:.3f} (this graph), dense {ppl['dense']:.3f}")
    return lines


def render_decoder_readme(config: BundleConfig, report: dict[str, Any]) -> str:
    """A dynamic-shape decoder bundle (cpu, gpu or fp32): one graph, a cache that grows by the new tokens."""
    ranks = [la.rank for la in config.cache if la.rank]
    dense = sum(1 for la in config.cache if la.kind == "dense")
    kinds = ([f"{dense} dense (K and V)"] if dense else []) + (
        [f"{len(ranks)} latent (r {min(ranks)}–{max(ranks)}, per layer in `{CONFIG_NAME}` → `cache`)"] if ranks else [])
    dtype = "/".join(sorted({t.dtype for t in config.cache[0].tensors})) if config.cache else "float32"
    lines = [
        f"# {config.model_name}: decoder bundle",
        "",
        *_files(config),
        "",
        "## Inputs and outputs (`model.onnx`, opset 21, dynamic batch and sequence)",
        "",
        "- `input_ids` int64 [B, n]: the new tokens",
        "- `attention_mask` int64 [B, past + n]: 1 for every real token so far (past and new)"
        + (", right padding only: attention runs as GroupQueryAttention, which takes each row's length from it"
           if (report.get("target") or {}).get("attention", {}).get("group_query_attention") else ""),
        "- `position_ids` int64 [B, n]: past, past + 1, … (where the graph has this input)",
    ]
    for tensor in config.cache[0].tensors if config.cache else []:
        part = tensor.input.rsplit(".", 1)[-1]
        shape = ", ".join("B" if d == "batch_size" else "past" if d == "past_sequence_length" else str(d)
                          for d in tensor.shape)
        grows = (f"the first {tensor.max_length} token(s) only: min(past + n, {tensor.max_length}) on axis "
                 f"{tensor.sequence_axis}" if tensor.max_length else f"past + n on axis {tensor.sequence_axis}")
        lines.append(f"- `past_key_values.{{i}}.{part}` {tensor.dtype} [{shape}] → `present.{{i}}.{part}` ({grows})")
    if config.cache and config.cache[-1].tensors[0].quantization is not None:
        quantization = config.cache[-1].tensors[0].quantization
        zero = quantization.get("zero_point", 0)
        codes = (f"4-bit codes, two per {config.cache[-1].tensors[0].dtype} byte ({quantization['packing']}), "
                 if quantization.get("bits") == 4 else f"{config.cache[-1].tensors[0].dtype} codes ")
        lines.append(f"- The latent tensors are {codes}with static per-channel "
                     f"scales inside the graph (`quantization` in `{CONFIG_NAME}`, value = (code − {zero}) · "
                     "scale[channel]): pass `present` back as `past` unchanged."
                     + (" `latent_sink` holds the first token's latent exactly (float32, the attention sink); the "
                        "graph reads it instead of that token's codes." if quantization.get("bits") == 4 else ""))
    lines += [
        f"- {len(config.cache)} layers: {', '.join(kinds)}. A latent layer caches one rank-r tensor instead of",
        "  K and V; the graph rebuilds keys and values from it.",
        "- `logits` float32 [B, n, vocab]",
        "",
        "## Driving it",
        "",
        f"1. Prefill: the prompt as `input_ids`, every cache input with past = 0 ({dtype}, zeros of shape [B, …, 0, …]).",
        *([f"   Feed a long prompt at most {config.prefill_chunk} tokens per call (`prefill_chunk` in `{CONFIG_NAME}`),",
           "   each chunk through the cache the previous one returned: attention here is not fused, and one call",
           "   holds [B, heads, n, past + n] scores per layer."] if config.prefill_chunk else []),
        "2. Decode: feed each `present.{i}.*` back as `past_key_values.{i}.*`, the chosen token as `input_ids`",
        "   [B, 1], the mask one longer, `position_ids` = the number of tokens so far.",
        "3. Greedy: next token = argmax of the last logits row; stop at an id of "
        f"`generation.eos_token_ids` ({config.generation.get('eos_token_ids', [])}).",
        "",
        "`samples/run_bundle.py` in qsvd-export is a reference loop with only onnxruntime, tokenizers and numpy;",
        "`samples/README.md` there spells out the contract for ports.",
        "",
        "## Numbers from report.json",
        "",
        *_numbers(report),
    ]
    return "\n".join(lines) + "\n"


def render_vlm_readme(config: BundleConfig, report: dict[str, Any]) -> str:
    """A vision-language bundle: three graphs chained by the runner (qsvd_export/runtimes/vlm.py)."""
    vlm = config.model_config["vlm"]
    decoder = render_decoder_readme(config, report).split("## Inputs and outputs", 1)[1]
    decoder = decoder.replace("- `input_ids` int64 [B, n]: the new tokens",
                              "- `inputs_embeds` float32 [B, n, hidden]: the new tokens' embeddings (`embed.onnx`)")
    lines = [
        f"# {config.model_name}: vision-language bundle",
        "",
        *_files(config),
        "",
        "## Chaining the graphs",
        "",
        "1. The processor (saved here; `AutoProcessor.from_pretrained(bundle)`) turns an image and a prompt into",
        f"   `input_ids` and `pixel_values` [frames, 3, {vlm['image_size']}, {vlm['image_size']}]: the image as tiles "
        "plus a global frame,",
        f"   each frame written as {vlm['image_seq_len']} image tokens (id {vlm['image_token_id']}) in the prompt.",
        "2. `vision.onnx`: `pixel_values` → `image_features` float32 [frames, "
        f"{vlm['image_seq_len']}, hidden].",
        "3. `embed.onnx`: `input_ids` int64 [B, n] → `inputs_embeds` float32 [B, n, hidden]; then overwrite the rows of",
        "   the image tokens, in order, with the frames' features (frame-major).",
        "4. `model.onnx` (the decoder): prefill with the merged embeddings; decode each new token through",
        "   `embed.onnx`. `qsvd-export run BUNDLE --image FILE --prompt TEXT` does all of this.",
        "",
        "## Decoder inputs and outputs" + decoder.split("## Driving it", 1)[0].split(")", 1)[1],
        "## Numbers from report.json",
        "",
        *_numbers(report),
    ]
    return "\n".join(lines) + "\n"


def render_encoder_readme(config: BundleConfig, report: dict[str, Any]) -> str:
    """An encoder or vision bundle: one forward, inputs and outputs as listed."""
    spec = config.graph("model")
    lines = [
        f"# {config.model_name}: {config.kind} bundle",
        "",
        *_files(config),
        "",
        "## Inputs and outputs (`model.onnx`, opset 21)",
        "",
        f"- inputs: {', '.join(f'`{n}`' for n in spec.inputs)}",
        f"- outputs: {', '.join(f'`{n}`' for n in spec.outputs)}",
        "",
        "## Numbers from report.json",
        "",
        *_numbers(report),
    ]
    return "\n".join(lines) + "\n"


def _cache_lines(config: BundleConfig, context: int, prefill: int) -> list[str]:
    layer = config.cache[0]  # shapes of layer 0; the layer list below says which layers differ in kind
    lines = []
    for tensor in layer.tensors:
        shape = ", ".join("1" if d == "batch_size" else "P" if d == "past_sequence_length" else str(d)
                          for d in tensor.shape)
        part = tensor.input.rsplit(".", 1)[-1]
        lines.append(f"- `past_key_values.{{i}}.{part}` {tensor.dtype} [{shape}] → `present.{{i}}.{part}` "
                     f"(sequence axis {tensor.sequence_axis})")
    if layer.tensors and layer.tensors[0].quantization is not None:
        lines.append("- The cache tensors are integer codes with one static scale and zero point each (`quantization` "
                     "in qsvd_config.json, value = (code − zero_point) · scale): pass `present` slots back as `past` "
                     "unchanged; never convert them.")
    kinds = sorted({f"{la.kind}{f' r={la.rank}' if la.rank else ''}" for la in config.cache})
    lines.append(f"- {len(config.cache)} layers: {', '.join(kinds)}. P = {context - prefill} for prefill, "
                 f"{context - 1} for decode; every `present.*` has {context} slots.")
    return lines


def render_npu_readme(config: BundleConfig, target: dict[str, Any]) -> str:
    static = config.static_shapes
    context, prefill = int(static["context_length"]), int(static["prefill_length"])
    from qsvd_export.targets.npu.verify import decisive_text

    check = target.get("verification", {})
    coded = bool(config.cache) and config.cache[0].tensors[0].quantization is not None
    io = "float32 logits, integer-coded cache" if coded else "float32"
    lines = [
        f"# {config.model_name} for Qualcomm QNN HTP ({target['bits']})",
        "",
        f"Two static ONNX graphs (opset 21, QuantizeLinear/DequantizeLinear inside, {io} I/O) that share",
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
                     f"agreement with the CPU EP {check['argmax_agreement']:.1%} over {check['window']} "
                     f"({decisive_text(check)}), "
                     f"max |Δlogit| {check['max_abs_logit_diff']}, greedy tokens "
                     f"{'identical' if check['tokens_match'] else 'different'}.")
    return "\n".join(lines) + "\n"
