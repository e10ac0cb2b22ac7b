"""β: how the singular values are split between the two factors (W_d = Σ^β·R, W_u = U·Σ^(1−β)).

In floating point β changes nothing; under quantization it moves range between the weights and the
latent activation. Per group we pick β from a grid by the quantized output error on calibration rows
(paper Eq. 14, measured on the group's projection outputs rather than the whole attention block).
"""

from __future__ import annotations

import torch

from qsvd_export.compress.svd import WhitenedSVD
from qsvd_export.quant.fake import fake_quant_activation, fake_quant_weight
from qsvd_export.quant.presets import Bits

BETA_GRID = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


def rotated_factors(svd: WhitenedSVD, keep: torch.Tensor, beta: float, rotation: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """(down [r, E], up [out, r]) with the latent rotation H folded in: down ← H·down, up ← up·Hᵀ."""
    down, up = svd.factors(keep, beta)
    if rotation is not None:
        down, up = rotation @ down, up @ rotation.T
    return down, up


def quantized_error(x: torch.Tensor, reference: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bits: Bits) -> float:
    """Relative squared error of fake-quantized x·downᵀ·upᵀ against ``reference`` [rows, out]."""
    qd = fake_quant_weight(down.float(), bits.weights) if bits.weights else down.float()
    qu = fake_quant_weight(up.float(), bits.weights) if bits.weights else up.float()
    latent = x @ qd.T
    if bits.activations and bits.activations < 16:
        latent = fake_quant_activation(latent, bits.activations)
    out = latent @ qu.T
    return float(((out - reference) ** 2).sum() / (reference**2).sum().clamp_min(1e-30))


def search_beta(
    svd: WhitenedSVD, keep: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, bits: Bits,
    rotation: torch.Tensor | None, grid: tuple[float, ...] = BETA_GRID,
) -> tuple[float, dict[float, float]]:
    """Best β on the grid for the group's weight [out, E] and calibration rows x [n, E]; returns (β, errors)."""
    reference = x @ weight.float().T
    errors = {beta: quantized_error(x, reference, *rotated_factors(svd, keep, beta, rotation), bits) for beta in grid}
    return min(errors, key=lambda b: (errors[b], abs(b - 0.5))), errors
