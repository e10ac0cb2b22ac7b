"""Find each attention block's Q/K/V projections in a torch model and swap in factored ones.

Weights are returned in torch ``nn.Linear`` orientation [out, in] whatever the module stores (GPT-2's
``Conv1D`` keeps [in, out] and fuses Q, K and V into one ``c_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qsvd_export.errors import UnsupportedModelError
from qsvd_export.models.vlm import unused_vision_layers

_SEPARATE_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


@dataclass
class AttentionProjections:
    """Q/K/V projections of one attention block. ``inputs`` is the module whose input is X [.., E]."""

    index: int
    path: str
    parent: nn.Module
    names: tuple[str, str, str] | None  # separate projections: attribute names on ``parent``
    fused_name: str | None  # GPT-2: one Conv1D producing [q | k | v]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    graph: str | None = None  # VLMs: the bundle graph of this block ("vision" or "model"); None: one graph

    @property
    def inputs(self) -> nn.Module:
        return getattr(self.parent, self.fused_name or self.names[0])  # type: ignore[index]

    @property
    def dims(self) -> dict[str, int]:
        q, k, v = self.weights()
        return {"e": q.shape[1], "q": q.shape[0], "k": k.shape[0], "v": v.shape[0]}

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Wq, Wk, Wv), each [out, in], detached fp32."""
        if self.fused_name:
            w = getattr(self.parent, self.fused_name).weight.detach().t()
            return tuple(w.split(w.shape[0] // 3, dim=0))  # type: ignore[return-value]
        return tuple(getattr(self.parent, n).weight.detach() for n in self.names)  # type: ignore[return-value]

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if self.fused_name:
            b = getattr(self.parent, self.fused_name).bias
            if b is None:
                return (None, None, None)
            return tuple(b.detach().split(b.shape[0] // 3))  # type: ignore[return-value]
        return tuple(  # type: ignore[return-value]
            None if getattr(self.parent, n).bias is None else getattr(self.parent, n).bias.detach()
            for n in self.names
        )

    def weight_params(self) -> list[nn.Parameter]:
        """The parameters whose gradients give G for Q, K, V (one fused parameter for GPT-2)."""
        if self.fused_name:
            return [getattr(self.parent, self.fused_name).weight]
        return [getattr(self.parent, n).weight for n in self.names]

    def weight_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Gq, Gk, Gv) in [out, in] orientation, after a backward pass."""
        if self.fused_name:
            g = getattr(self.parent, self.fused_name).weight.grad.t()
            return tuple(g.split(g.shape[0] // 3, dim=0))  # type: ignore[return-value]
        return tuple(getattr(self.parent, n).weight.grad for n in self.names)  # type: ignore[return-value]

    def replace(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        """Swap in new Q/K/V modules (each maps [.., E] → [.., out])."""
        if self.fused_name:
            setattr(self.parent, self.fused_name, _FusedQKV(q, k, v))
        else:
            for name, module in zip(self.names, (q, k, v)):  # type: ignore[arg-type]
                setattr(self.parent, name, module)


class _FusedQKV(nn.Module):
    """Stands in for a fused QKV projection: concatenates three projections' outputs."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _head_counts(config: Any) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def _vision_tower(model: nn.Module) -> tuple[str, Any] | None:
    """(path prefix, config) of a VLM's vision tower: the module whose ``config`` is the vision config."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return None
    for path, module in model.named_modules():
        if path and getattr(module, "config", None) is vision_config:
            return path + ".", vision_config
    raise UnsupportedModelError(f"{type(model).__name__}: vision config without a vision tower module")


def attention_projections(model: nn.Module) -> list[AttentionProjections]:
    """Every self-attention block's projections, in module order (a VLM: vision tower first, ``graph``
    "vision", then the language model, ``graph`` "model"), each with its own tower's head counts; vision
    layers whose output no image feature reads are left out. Raises if none is found."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_heads = _head_counts(text_config)
    vision = _vision_tower(model)
    unused = tuple(f"{p}." for p in unused_vision_layers(model)) if vision is not None else ()
    found: list[AttentionProjections] = []
    for path, module in model.named_modules():
        if "crossattention" in path or (unused and path.startswith(unused)):
            continue
        names = next((n for n in _SEPARATE_NAMES if all(isinstance(getattr(module, a, None), nn.Linear) for a in n)), None)
        fused = "c_attn" if type(getattr(module, "c_attn", None)).__name__ == "Conv1D" else None
        if names is None and fused is None:
            continue
        graph, heads = None, text_heads
        if vision is not None:
            in_vision = path.startswith(vision[0])
            graph, heads = ("vision", _head_counts(vision[1])) if in_vision else ("model", text_heads)
        found.append(AttentionProjections(len(found), path, module, names, fused, *heads, graph=graph))
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention Q/K/V projections found")
    return found
