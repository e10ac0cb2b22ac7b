"""Whitened SVD of (joint) projection weights and the factors it yields.

Orientation: W [out, in] (``nn.Linear``). With a whitening S [E, E] (S Sᵀ ≈ E[xᵀx] for ``cholesky``,
diag(E|x|)^α for ``absmean``): W S = U Σ Vᵀ, so W = Σ_i σ_i u_i (Vᵀ S⁻¹)_i. Keeping components ``idx``
with split exponent β gives the shared down-projection W_d = diag(σ^β) (Vᵀ S⁻¹)[idx] [r, E] and the
up-projection W_u = U[:, idx] diag(σ^(1−β)) [out, r]; y = x W_dᵀ W_uᵀ (+ bias, kept exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qsvd_export.compress.calibrate import InputStats

WHITENINGS = ("fisher", "absmean", "cholesky", "none")


@dataclass
class Whitening:
    """S and S⁻¹ as dense float64 [E, E] matrices."""

    kind: str
    s: torch.Tensor
    s_inv: torch.Tensor


def whitening(stats: InputStats, kind: str, alpha: float = 0.5, damping: float = 1e-4) -> Whitening:
    """Whitening from calibration statistics.

    ``cholesky`` (SVD-LLM): S = chol(E[xᵀx] + δ·mean(diag)·I), the output-error-optimal choice.
    ``absmean`` (ASVD): S = diag(E|x|^α). ``none``: identity. ``fisher``: absmean on the input side;
    the caller adds the output-gradient Fisher side (:func:`output_whitening`).
    """
    dim = stats.abs_sum.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=stats.abs_sum.device)
    if kind == "none":
        return Whitening(kind, eye, eye)
    if kind in ("absmean", "fisher"):  # fisher: absmean on the input side, output side in output_whitening
        scale = stats.abs_mean().clamp_min(1e-8) ** alpha
        return Whitening(kind, torch.diag(scale), torch.diag(1.0 / scale))
    if kind != "cholesky":
        raise ValueError(f"unknown whitening '{kind}' (choose from {', '.join(WHITENINGS)})")
    cov = stats.covariance()
    cov = (cov + cov.T) / 2
    jitter = damping * cov.diagonal().mean().clamp_min(1e-12)
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            break
        jitter *= 10
    else:  # pragma: no cover - only for pathological statistics
        raise ValueError("input covariance is not positive definite even with damping")
    return Whitening(kind, lower, torch.linalg.solve_triangular(lower, eye, upper=False))


@dataclass
class WhitenedSVD:
    """W ≈ U diag(σ) R with R = Vᵀ S⁻¹; ``m`` = min(out, E) components, σ descending (float64).

    U, R and M are computed in float64 and stored in float32: a model's candidate factors are the torch
    stage's largest allocation (every candidate grouping of every layer, alive until allocation)."""

    u: torch.Tensor  # [out, m] float32
    sigma: torch.Tensor  # [m] float64
    r: torch.Tensor  # [m, E] float32
    m_proj: torch.Tensor  # S⁻ᵀ V [E, m] float32: ⟨G, σ_i u_i r_i⟩ = σ_i (Uᵀ G S⁻ᵀ V)_ii

    @property
    def size(self) -> int:
        return int(self.sigma.shape[0])

    def first_order(self, grad: torch.Tensor) -> torch.Tensor:
        """σ_i · [Uᵀ G S⁻ᵀ V]_ii for one gradient G [out, E] → [m] (float64)."""
        g = grad.double()
        return self.sigma * ((self.u.double() * (g @ self.m_proj.double())).sum(0))

    def factors(self, keep: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_d [r, E], W_u [out, r]) in float64 for the component indices ``keep`` and split exponent β."""
        sigma = self.sigma[keep]
        down = sigma[:, None] ** beta * self.r[keep]
        up = self.u[:, keep] * sigma[None, :] ** (1.0 - beta)
        return down, up


def whitened_svd(weight: torch.Tensor, white: Whitening,
                 output: tuple[torch.Tensor, torch.Tensor] | None = None) -> WhitenedSVD:
    """SVD of T·W·S for W [out, E] (any float dtype), computed in float64.

    ``output`` = (T, T⁻¹) [out, out] weights the output channels (identity if None); the
    components are then u_i = T⁻¹U_i, so W = Σ σ_i u_i r_i still holds.
    """
    w = weight.double()
    if output is not None:
        w = output[0] @ w
    u, sigma, vt = torch.linalg.svd(w @ white.s, full_matrices=False)
    if output is not None:
        u = output[1] @ u
    r = (vt @ white.s_inv).float()
    # diagonal S (every kind but cholesky): S⁻ᵀV = (VᵀS⁻¹)ᵀ exactly, so share r's memory
    m_proj = r.T if white.kind != "cholesky" else (white.s_inv.T @ vt.T).float()
    return WhitenedSVD(u.float(), sigma, r, m_proj)


def output_whitening(fisher: torch.Tensor, gamma: float = 0.5, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T⁻¹) = F^(γ/2), F^(−γ/2) of the output-gradient Fisher F [out, out] (eigenvalues floored)."""
    f = (fisher + fisher.T) / 2
    values, vectors = torch.linalg.eigh(f)
    values = values.clamp_min(values.max().clamp_min(1e-30) * floor)
    return vectors @ torch.diag(values ** (gamma / 2)) @ vectors.T, vectors @ torch.diag(values ** (-gamma / 2)) @ vectors.T
