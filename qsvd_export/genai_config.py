"""``genai_config.json`` for onnxruntime-genai, derived from a bundle's own ``qsvd_config.json``.

The writer reads the cache description (per-layer tensors, shapes, dtypes), never the model family, so any
cache that genai's default KV cache can bind works, latent ones included. What genai 0.18 binds
(``src/models/kv_cache.cpp``, ``DefaultKeyValueCache``; onnxruntime-genai a0c04eb13):

- per layer exactly one ``past_key_values.{i}.key`` and one ``.value`` input with ``present.{i}.key|value``
  outputs, 4-D ``[batch, heads, past_sequence_length, head_size]`` (sequence axis 2), key and value of one
  shape (the cache allocates both from the key's input shape);
- one dtype for every cache tensor (``type_`` is read off the first key input; float32, float16, int8 and
  uint8 are handled). Scales of a quantized cache must be constants inside the graph: genai feeds no other
  per-layer cache tensor;
- heads and head size may differ between layers (0.18 detects per-layer shapes from the session's inputs);
  the config's ``num_key_value_heads`` / ``head_size`` are layer 0's.

A bundle that caches one latent per layer (``past_key_values.{i}.latent``, float32 or uint8 codes) runs through
``model.genai.onnx``, the same graph with each latent shown as a key/value pair (:mod:`qsvd_export.genai_latent`).

Layouts it cannot bind are *refused with a reason* (recorded in report.json and the bundle README), never an
error: a latent with a second cache tensor (the 4-bit latent's sink), other 3-D caches, mixed dtypes, static-shape npu graphs (genai's
QNN sliding-window cache, ``src/models/windowed_kv_cache.cpp``, wants uint8 caches, keys stored transposed
``[heads, batch, head_size, slots]`` and presents of only the new window, where our npu graphs take float
caches ``[batch, heads, slots, head_size]`` and return all slots), encoders and vision-language bundles
(genai's VLM types are a fixed list in ``src/models/model_type.h``; idefics3 and llava are not in it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsvd_export.bundle import BundleConfig, CacheTensor

GENAI_CONFIG = "genai_config.json"
GENAI_VERSION = "0.18.0"  # the version the configs are tested with (tests/test_genai_config.py, slow venv test)
# src/models/model_type.h (IsLLM): model types genai knows; any other decoder runs as the generic "decoder"
_LLM_TYPES = {"chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "internlm2",
              "llama", "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3", "phi3small", "qwen2", "qwen3", "smollm3"}
_GENAI_DTYPES = {"float32", "float16", "int8", "uint8"}
_PROVIDERS = {"gpu": [{"cuda": {}}]}  # cpu and graph-only bundles: genai's default (CPU EP)


@dataclass(frozen=True)
class GenaiDecision:
    """Either ``config`` (the genai_config.json to write) or ``reason`` (why genai cannot run the bundle)."""

    config: dict[str, Any] | None
    reason: str = ""
    latent_graph: bool = False  # the config runs model.genai.onnx (each latent shown as key/value), to be written
    padding_bytes_per_token: int = 0  # what that view adds per token over the latent (odd ranks)

    def report(self) -> dict[str, Any]:
        """The ``runtimes.onnxruntime_genai`` entry of report.json."""
        if self.config is None:
            return {"runs": False, "reason": self.reason}
        entry = {"runs": True, "file": GENAI_CONFIG, "tested_version": GENAI_VERSION}
        if self.latent_graph:
            from qsvd_export.genai_latent import GENAI_GRAPH

            entry.update(graph=GENAI_GRAPH, layout="each latent [batch, past, r] as key and value [batch, 1, past, "
                                                   "ceil(r/2)] halves, joined inside the graph; weights shared with "
                                                   "model.onnx", padding_bytes_per_token=self.padding_bytes_per_token)
        return entry


def _cache_refusal(config: BundleConfig) -> str:
    """Why genai's default KV cache cannot bind ``config.cache`` ("" when it can)."""
    if not config.cache:
        return "the decoder graph has no cache inputs"
    dtypes = set()
    for layer in config.cache:
        parts = {t.input.rsplit(".", 1)[-1]: t for t in layer.tensors}
        if set(parts) != {"key", "value"} or len(layer.tensors) != 2:
            return (f"layer {layer.layer} caches {', '.join(sorted(t.input for t in layer.tensors))}: genai binds exactly "
                    "past_key_values.{i}.key and .value per layer")
        key, value = parts["key"], parts["value"]
        for tensor in (key, value):
            if len(tensor.shape) != 4 or tensor.sequence_axis != 2:
                return f"{tensor.input} is {tensor.shape}: genai binds [batch, heads, past_sequence_length, head_size]"
            if not all(isinstance(d, int) for d in (tensor.shape[1], tensor.shape[3])):
                return f"{tensor.input} has a symbolic head dim: genai needs static heads and head size"
        if key.shape != value.shape:
            return (f"layer {layer.layer}: key {key.shape} and value {value.shape} differ; genai allocates both from the "
                    "key's shape")
        if key.output != f"present.{layer.layer}.key" or value.output != f"present.{layer.layer}.value":
            return f"layer {layer.layer}: outputs {key.output}, {value.output} are not present.{{i}}.key|value"
        dtypes.update((key.dtype, value.dtype))
    indices = [layer.layer for layer in config.cache]
    if indices != list(range(len(indices))):
        return f"cache layers {indices} are not 0..{len(indices) - 1}"
    if len(dtypes) > 1:
        return f"cache tensors mix dtypes {sorted(dtypes)}; genai takes one dtype from the first key input"
    if not dtypes <= _GENAI_DTYPES:
        return f"cache dtype {dtypes.pop()} is not one genai allocates ({', '.join(sorted(_GENAI_DTYPES))})"
    return ""


def decide(config: BundleConfig, target: str | None = None) -> GenaiDecision:
    """The genai config of a bundle (``target``: the bundle's target stage, None for fp32), or the reason
    there is none."""
    if config.kind != "decoder":
        why = {"encoder": "genai runs generative decoders; an encoder bundle has no generation loop",
               "vision": "genai runs generative decoders; a vision graph has no generation loop",
               "vlm": f"genai's vision-language models are a fixed list of types (src/models/model_type.h IsVLM) and "
                      f"'{config.model_type}' is not one of them"}
        return GenaiDecision(None, why.get(config.kind, f"a {config.kind} bundle is not a decoder"))
    if config.static_shapes:
        dtype = config.cache[0].tensors[0].dtype if config.cache else "float32"
        return GenaiDecision(None, "static-shape npu graphs: genai's QNN sliding-window cache "
                                   "(src/models/windowed_kv_cache.cpp) needs uint8 cache I/O, keys as "
                                   "[heads, batch, head_size, slots] and presents of the new window only; these graphs "
                                   f"take {dtype} [batch, heads, slots, head_size] caches and return every slot")
    spec = config.graph("model")
    if "logits" not in spec.outputs or "input_ids" not in spec.inputs:
        return GenaiDecision(None, "the graph needs input_ids and logits (genai feeds token ids)")
    if any(layer.kind == "latent" for layer in config.cache):
        from qsvd_export.genai_latent import GENAI_GRAPH, latent_view

        view = latent_view(config)
        if isinstance(view, str):
            return GenaiDecision(None, view)
        shown = dataclasses.replace(config, cache=view)
        refusal = _cache_refusal(shown)
        if refusal:
            return GenaiDecision(None, refusal)
        return GenaiDecision(_config(shown, GENAI_GRAPH, target), latent_graph=True,
                             padding_bytes_per_token=shown.kv_bytes_per_token() - config.kv_bytes_per_token())
    refusal = _cache_refusal(config)
    if refusal:
        return GenaiDecision(None, refusal)
    return GenaiDecision(_config(config, spec.filename, target))


def _config(config: BundleConfig, filename: str, target: str | None) -> dict[str, Any]:
    model, generation = config.model_config, config.generation
    first: CacheTensor = config.cache[0].tensors[0]
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    graph_inputs = config.graph("model").inputs
    for name in ("attention_mask", "position_ids"):
        if name in graph_inputs:
            inputs[name] = name
    eos = [int(e) for e in generation.get("eos_token_ids", [])]
    context = int(model.get("context_length") or generation.get("max_length") or 2048)
    model_type = config.model_type if config.model_type in _LLM_TYPES else "decoder"
    return {
        "model": {
            "bos_token_id": int(generation.get("bos_token_id") or 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": _PROVIDERS.get(target or "", [])},
                "filename": filename,
                "head_size": int(first.shape[3]),
                "hidden_size": int(model.get("hidden_size", 0)),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(model.get("num_attention_heads", 0)),
                "num_hidden_layers": len(config.cache),
                "num_key_value_heads": int(first.shape[1]),
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": int(generation["pad_token_id"] if generation.get("pad_token_id") is not None
                                else (eos[0] if eos else 0)),
            "type": model_type,
            "vocab_size": int(model.get("vocab_size", 0)),
        },
        "search": {  # greedy, as `qsvd-export run` decodes
            "do_sample": False, "early_stopping": True, "length_penalty": 1.0, "max_length": context,
            "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
            "top_p": 1.0,
            # unfused attention: genai feeds a prompt through the cache this many tokens per forward
            **({"chunk_size": config.prefill_chunk} if config.prefill_chunk else {}),
        },
    }


def write_genai_config(folder: Path, config: BundleConfig, target: str | None = None) -> dict[str, Any]:
    """Write ``genai_config.json`` into ``folder`` when genai can run the bundle; returns the report entry."""
    decision = decide(config, target)
    if decision.latent_graph:
        from qsvd_export.genai_latent import write_genai_graph

        write_genai_graph(Path(folder), config)
    if decision.config is not None:
        (Path(folder) / GENAI_CONFIG).write_text(json.dumps(decision.config, indent=2) + "\n")
    return decision.report()
