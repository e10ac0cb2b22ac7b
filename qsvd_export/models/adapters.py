"""Per-family facts: model class, kind (decoder / encoder / vision), cache geometry, mask kinds.

Adapters are keyed by ``config.model_type``. Anything not listed is refused with
:class:`UnsupportedModelError` before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qsvd_export.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    kind: str  # "decoder" | "encoder" | "vision" | "vlm"
    auto_class: str  # transformers class name used to instantiate the model

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.auto_class)

    # --- decoder cache geometry -------------------------------------------------------------
    @staticmethod
    def num_layers(config: Any) -> int:
        return int(config.num_hidden_layers)

    @staticmethod
    def num_heads(config: Any) -> int:
        return int(config.num_attention_heads)

    @staticmethod
    def num_kv_heads(config: Any) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    @staticmethod
    def head_dim(config: Any) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    @staticmethod
    def layer_types(config: Any) -> list[str]:
        """Per-layer attention kind: ``full_attention`` or ``sliding_attention``."""
        types = getattr(config, "layer_types", None)
        if types is None:
            return ["full_attention"] * int(config.num_hidden_layers)
        return list(types)

    @staticmethod
    def sliding_window(config: Any) -> int | None:
        return getattr(config, "sliding_window", None)


_ADAPTERS: dict[str, ArchAdapter] = {
    a.model_type: a
    for a in (
        ArchAdapter("llama", "decoder", "AutoModelForCausalLM"),
        ArchAdapter("mistral", "decoder", "AutoModelForCausalLM"),
        ArchAdapter("qwen2", "decoder", "AutoModelForCausalLM"),
        ArchAdapter("qwen3", "decoder", "AutoModelForCausalLM"),
        ArchAdapter("gemma3_text", "decoder", "AutoModelForCausalLM"),
        ArchAdapter("gpt2", "decoder", "AutoModelForCausalLM"),
        ArchAdapter("bert", "encoder", "AutoModel"),
        ArchAdapter("vit", "vision", "AutoModel"),
        ArchAdapter("dinov2", "vision", "AutoModel"),
        ArchAdapter("idefics3", "vlm", "AutoModelForImageTextToText"),
        ArchAdapter("llava", "vlm", "AutoModelForImageTextToText"),
    )
}


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for_config(config: Any) -> ArchAdapter:
    """Return the adapter for ``config.model_type`` or raise :class:`UnsupportedModelError`."""
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(supported_model_types())})"
        )
    return adapter
