"""What every recipe starts from: a model loaded for export (zoo entry, tiny family or local folder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoadedModel:
    """A model ready for export: ``model`` is an eval-mode fp32 ``PreTrainedModel``."""

    name: str
    model: Any
    tokenizer: Any | None
    kind: str  # "decoder" | "encoder" | "vision" | "vlm"
    source: dict[str, Any] = field(default_factory=dict)
    chat: bool = False  # an instruct model whose prompts go through the chat template
    weights_dir: Path | None = None  # the safetensors folder ``model`` was loaded from (None: built in memory)
    processor: Any | None = None  # VLMs: the transformers processor (image processor + ``tokenizer``)
