"""Files that let other runtimes open a bundle as it is: onnxruntime-genai and optimum / transformers.

- ``genai_config.json`` (:mod:`qsvd_export.genai_config`) where genai can bind the cache, else the reason;
- ``config.json`` + ``generation_config.json`` of a decoder (optimum's ``ORTModelForCausalLM`` reads them);
- ``tokenizer_config.json`` readable by transformers 4.x as well as 5.x and by genai's tokenizer: transformers 5
  names the class ``TokenizersBackend``, which 4.x does not know (``PreTrainedTokenizerFast`` loads the same
  ``tokenizer.json`` in both), and writes the chat template to ``chat_template.jinja`` only (genai reads
  ``chat_template`` from tokenizer_config.json).

The outcome goes to report.json (``runtimes``) and a short README section, so a receiver sees why a bundle
does not run in genai instead of meeting an error there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qsvd_export.bundle import BundleConfig

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_DROPPED_KEYS = ("quantization_config",)  # a GGUF load leaves it; the bundle's weights are not that format


def write_hf_config(folder: Path, config: Any, kind: str) -> list[str]:
    """``config.json`` and ``generation_config.json`` of a decoder's HF ``config`` (a ``PretrainedConfig``) in
    ``folder``; returns the names written (none for other kinds)."""
    if kind != "decoder" or not hasattr(config, "to_dict"):
        return []
    data = {k: v for k, v in config.to_dict().items() if k not in _DROPPED_KEYS}
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
        data["rope_theta"] = rope["rope_theta"]  # transformers 4.x reads the top-level key
    data["use_cache"] = True  # the graph has cache I/O
    (Path(folder) / HF_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (Path(folder) / GENERATION_CONFIG).write_text(json.dumps(_generation(data), indent=2, sort_keys=True) + "\n")
    return [HF_CONFIG, GENERATION_CONFIG]


def _generation(data: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation defaults, as ``qsvd-export run`` decodes."""
    out: dict[str, Any] = {"do_sample": False}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if data.get(key) is not None:
            out[key] = data[key]
    return out


def portable_tokenizer_config(folder: Path) -> bool:
    """Make ``folder``'s tokenizer_config.json loadable by transformers 4.x and 5.x; True if it changed."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file() or not (Path(folder) / "tokenizer.json").is_file():
        return False
    data = json.loads(path.read_text())
    changed = False
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASS
        changed = True
    template = Path(folder) / "chat_template.jinja"
    if "chat_template" not in data and template.is_file():  # 5.x writes it beside; genai and 4.x read it inside
        data["chat_template"] = template.read_text()
        changed = True
    extra = data.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x writes a list; 4.x expects a name → token mapping
        if extra:
            data.setdefault("additional_special_tokens", extra)
        del data["extra_special_tokens"]
        changed = True
    if changed:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return changed


def write_runtime_files(folder: Path, config: BundleConfig, target: str | None) -> dict[str, Any]:
    """genai config and the portable tokenizer config in ``folder``; returns report.json's ``runtimes`` entry."""
    from qsvd_export.genai_config import write_genai_config

    folder = Path(folder)
    portable_tokenizer_config(folder)
    return {"onnxruntime_genai": write_genai_config(folder, config, target), "optimum": _optimum(folder, config)}


def _optimum(folder: Path, config: BundleConfig) -> dict[str, Any]:
    """Whether optimum's ORTModelForCausalLM can open the bundle: it sizes the cache from config.json's head
    counts and names it past_key_values.{i}.key|value, so only dense dynamic decoder bundles qualify."""
    files = [name for name in (HF_CONFIG, GENERATION_CONFIG) if (folder / name).is_file()]
    if not files:
        return {"runs": False, "reason": "no config.json (not a decoder bundle built from a transformers model)"}
    if config.static_shapes:
        return {"runs": False, "reason": "static-shape npu graphs; optimum feeds dynamic shapes"}
    if any(layer.kind != "dense" for layer in config.cache):
        return {"runs": False, "reason": "latent caches: optimum builds key/value caches from config.json's heads"}
    return {"runs": True, "files": files, "tested": "dense fp32 smollm2, optimum-onnx 0.1.0, transformers 4.57.6"}


def readme_section(runtimes: dict[str, Any]) -> str:
    """The README lines on other runtimes (from report.json's ``runtimes``)."""
    genai = runtimes["onnxruntime_genai"]
    lines = ["", "## Other runtimes", ""]
    if genai["runs"]:
        lines.append(f"- onnxruntime-genai: `{genai['file']}` (tested with {genai['tested_version']}); "
                     "`og.Model(bundle)`, see samples/genai_chat.py")
        if genai.get("graph"):
            lines.append(f"  genai runs `{genai['graph']}`: {genai['layout']} (+{genai['padding_bytes_per_token']} "
                         "B/token of odd-rank padding in genai's cache)")
    else:
        lines.append(f"- onnxruntime-genai: not runnable: {genai['reason']}")
    optimum = runtimes["optimum"]
    if optimum["runs"]:
        lines.append("- optimum: `ORTModelForCausalLM.from_pretrained(bundle)` reads "
                     + ", ".join(f"`{f}`" for f in optimum["files"]) + f" (tested: {optimum['tested']})")
    else:
        lines.append(f"- optimum: not runnable: {optimum['reason']}")
    return "\n".join(lines) + "\n"
