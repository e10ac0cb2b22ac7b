"""The KV cache of fused attention (cpu target): options, per-block latent layouts, the bundle's cache entries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qsvd_export.build.stages import plain_causal_model
from qsvd_export.errors import UsageError
from qsvd_export.loaded import LoadedModel

if TYPE_CHECKING:
    from qsvd_export.compress.options import CompressOptions


@dataclass(frozen=True)
class KvCacheOptions:
    """The KV cache of fused attention: ``budget`` (cached values ÷ dense, None = keep every value),
    ``bits`` (8 = int8, 4 = int4 codes packed in uint8, with static per-channel scales; None = float), ``groups`` (latent groups per
    block, None = one per KV head), calibrated on ``calib_windows`` × 512 tokens of ``calib_text``."""

    budget: float | None = None
    bits: int | None = None
    groups: int | None = None
    calib_windows: int = 32
    calib_text: str = "wiki_calib"

    @property
    def active(self) -> bool:
        return self.budget is not None or self.bits is not None

    def check(self, target: str | None) -> None:
        if not self.active:
            return
        if target != "cpu":
            raise UsageError(f"--kv-bits and a KV budget on fused attention need --target cpu (got {target or 'none'})")
        if self.bits not in (None, 8, 4):
            raise UsageError(f"--kv-bits {self.bits} is not available (cpu: 8 or 4, or 32 for a float cache)")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise UsageError(f"KV budget must be in (0, 1], got {self.budget}")
        if self.groups is not None and self.groups < 1:
            raise UsageError(f"--latent-groups must be at least 1, got {self.groups}")
        if self.calib_windows < 1:
            raise UsageError(f"--calib-windows is too small ({self.calib_windows})")


def latent_kv_layers(model: ir.Model, loaded: LoadedModel, target: str | None,
                     kv: KvCacheOptions) -> tuple[dict[int, Any], dict[str, Any]]:
    """Per fusable attention block the cache layout ``kv`` asks for, calibrated by running ``model`` in ONNX
    Runtime on the model's tokenizer windows (:func:`qsvd_export.compress.latent_attention.plan_latent_attention`)."""
    from qsvd_export.compress.latent_attention import plan_latent_attention
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.progress import info

    kv.check(target)
    if not plain_causal_model(loaded):
        raise UsageError(f"{loaded.name}: a latent or int8 KV cache runs in fused GroupQueryAttention, which takes "
                         "plain causal decoders only (llama, qwen2/qwen3 without sliding windows)")
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name}: no tokenizer, so no calibration text for the KV cache")
    windows = token_windows(loaded.tokenizer, read_text(kv.calib_text), 512, kv.calib_windows, source=kv.calib_text)
    info(f"KV cache: {'budget ' + str(kv.budget) if kv.budget is not None else 'dense'}, "
         f"{kv.bits or 32}-bit, calibrated on {kv.calib_windows} x 512 tokens")
    return plan_latent_attention(model, windows, kv.budget, kv.groups, kv.bits)


def latent_cache_layout(model: ir.Model, latent: dict[int, Any]) -> list[Any]:
    """The cache entries of a graph whose fused attention reads ``latent`` layouts: read off its I/O, each
    layer with a latent (factors, not the identity) marked ``latent`` with its rank."""
    from qsvd_export.export import cache_layout_from_graph

    layers = cache_layout_from_graph(model)
    for layer, layout in zip(layers, (latent[i] for i in sorted(latent))):
        if layout.key_down is not None:
            layer.kind, layer.rank = "latent", layout.rank
    return layers


def absorbed_kv(loaded: LoadedModel, options: CompressOptions, target: str | None, dense_graph: Path | None) -> bool:
    """Whether ``compress`` meets its budget with absorbed latent attention: the cpu target, a plain causal
    decoder, a KV-only budget, no residual rotation and no given dense graph."""
    return (target == "cpu" and plain_causal_model(loaded) and options.budget.params is None
            and options.budget.kv is not None and not options.residual_rotation and dense_graph is None)

