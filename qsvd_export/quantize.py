"""Bit-width presets and fake quantization (round-to-nearest) shared by the torch stage and checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qsvd_export.errors import UsageError


@dataclass(frozen=True)
class Bits:
    weights: int | None  # None = floating point
    activations: int | None

    @property
    def name(self) -> str:
        if self.weights is None:
            return "fp"
        return f"w{self.weights}a{self.activations}"


PRESETS = {"fp": Bits(None, None), "w8a16": Bits(8, 16), "w8a8": Bits(8, 8), "w4a16": Bits(4, 16),
           "w4a8": Bits(4, 8), "w4a4": Bits(4, 4)}


def parse_bits(text: str) -> Bits:
    if text not in PRESETS:
        raise UsageError(f"invalid bit widths '{text}' (choose from {', '.join(PRESETS)})")
    return PRESETS[text]


def fake_quant_weight(w: torch.Tensor, bits: int, clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)) -> torch.Tensor:
    """Symmetric per-output-channel (rows of [out, in]) RTN with a per-row MSE search over clip ratios."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best, best_err = w, torch.full_like(amax, float("inf"))
    for ratio in clip_grid:
        scale = amax * ratio / qmax
        q = (w / scale).round().clamp(-qmax - 1, qmax) * scale
        err = ((q - w) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best = torch.where(better, q, best)
        best_err = torch.where(better, err, best_err)
    return best


def fake_quant_activation(x: torch.Tensor, bits: int, per_token: bool = False) -> torch.Tensor:
    """Asymmetric RTN: one range for the whole tensor (static, NPU style) or per token (last axis rows)."""
    levels = 2**bits - 1
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.min(), x.max()
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, levels).sub(zero).mul(scale)
