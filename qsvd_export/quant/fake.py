"""Fake quantization in torch (the torch stage's β search and quality checks): round-to-nearest weights with
a clip search, per-tensor or per-token activations."""

from __future__ import annotations

import torch


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
