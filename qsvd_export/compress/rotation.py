"""Orthogonal rotations for the latent (H2): seeded random orthogonal or randomized Hadamard."""

from __future__ import annotations

import numpy as np
import torch

ROTATIONS = ("orthogonal", "hadamard", "none")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal [n, n] (float64) from a seeded Gaussian QR with the sign fix."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.from_numpy(q * np.sign(np.diag(r))[None, :])


def randomized_hadamard(n: int, seed: int) -> torch.Tensor:
    """H·diag(±1)/√n for n a power of two (Sylvester construction), float64."""
    if n & (n - 1) or n == 0:
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return torch.from_numpy(h * signs[None, :] / np.sqrt(n))


def latent_rotation(kind: str, n: int, seed: int) -> tuple[str, torch.Tensor | None]:
    """(kind actually used, matrix or None). ``hadamard`` falls back to ``orthogonal`` when n is no power of 2."""
    if kind == "none":
        return "none", None
    if kind == "hadamard" and n & (n - 1) == 0:
        return "hadamard", randomized_hadamard(n, seed)
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation '{kind}'")
    return "orthogonal", random_orthogonal(n, seed)
