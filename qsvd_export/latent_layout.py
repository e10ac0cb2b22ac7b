"""The absorbed latent attention of one block, as the graph stage consumes it (numpy only).

``KVH`` KV heads of size ``D`` are split into ``groups`` consecutive groups of ``m = KVH / groups`` heads;
each group caches a key latent and a value latent of ``rank`` values per token (the GroupQueryAttention
"KV heads" of size ``rank``). ``None`` factors mean the identity (``groups == KVH``, ``rank == D``: a dense
cache, quantized when scales are given). Fitting: :mod:`qsvd_export.compress.latent_factors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LatentLayer:
    groups: int
    rank: int
    key_down: np.ndarray | None  # [G, r, m·D]: c_k[g] = key_down[g] · k_g (post-RoPE keys of the group)
    key_up: np.ndarray | None  # [G, m·D, r]: k̂_g = key_up[g] · c_k[g] (absorbed into the queries)
    value_down: np.ndarray | None  # [G, r, m·D]
    value_up: np.ndarray | None  # [G, m·D, r] (applied after the attention weights)
    key_scale: np.ndarray | None = None  # [G, r] symmetric quantization step per latent channel; None = float
    value_scale: np.ndarray | None = None
    cache_bits: int | None = None  # 8 (int8 cache) or 4 (two int4 codes per uint8) with scales; None = float

    def __post_init__(self) -> None:
        scaled = self.key_scale is not None and self.value_scale is not None
        if (self.cache_bits is not None) != scaled or self.cache_bits not in (None, 4, 8):
            raise ValueError(f"cache_bits {self.cache_bits} needs both scales (and bits 4 or 8); a float cache neither")

    @property
    def cache_width(self) -> int:
        """Cached values per token, keys and values."""
        return 2 * self.groups * self.rank

    @property
    def cache_bytes(self) -> float:
        """Cache bytes per token (keys and values), scales excluded (they are graph constants)."""
        return self.cache_width * (self.cache_bits or 32) / 8


def dense_quantized(kv_heads: int, head_dim: int, key_scale: np.ndarray, value_scale: np.ndarray,
                    bits: int) -> LatentLayer:
    """A dense cache at ``bits``: identity factors, per-channel scales [KVH, D]."""
    return LatentLayer(kv_heads, head_dim, None, None, None, None, key_scale, value_scale, bits)
