"""Absorbed latent attention: per-group low-rank maps of the post-RoPE keys and of the values.

Layout (one attention block, ``KVH`` KV heads of size ``D``, ``H`` query heads, ``G`` latent groups, each
holding ``m = KVH / G`` consecutive KV heads, rank ``r`` per group for keys and for values alike):

    c_k[g] = key_down[g] · k_g        (k_g: the group's post-RoPE keys [m·D]; c_k[g]: [r], cached)
    k̂_g    = key_up[g] · c_k[g]       (never formed: query head h of KV head κ in g scores
                                        (key_up[g][κ]ᵀ q_h) · c_k[g], the query is mapped into latent space)
    c_v[g] = value_down[g] · v_g      (cached)
    o_h    = value_up[g][κ] · Σ_t p_ht c_v[g]_t   (values folded after the attention weights)

The decode step therefore reads each cached latent once per query head, ``2·r`` multiply-adds per head
and cached token against dense's ``2·D``, and no cached token is ever up-projected. RoPE needs no special
care: the keys are compressed after rotation, so the score of a cached token never depends on its
position again. The latent is what is cached, at 8 bits with one static scale per latent channel.

Fitting (from :class:`~qsvd_export.compress.attention_stats.AttentionStats`):
- keys in the metric of their queries: scores are qᵀk, so the key error that matters is
  E‖Q_κᵀ(k − k̂)‖² with Q_κ the second moment of the query heads reading KV head κ. With L = M^{1/2}
  (M = blockdiag of the group's query moments), the top-r eigenvectors E of L·Σ_k·L give
  key_down = Eᵀ·L, key_up = L⁻¹·E (the whitened PCA, optimal for that error);
- values in the metric of the output projection (the value error that matters is ‖W_hᵀ(v − v̂)‖² over
  the heads reading it), the same whitened PCA; plain PCA when the projection is not found;
- int8 scales per latent channel from the calibration rows' latent ranges (absmax, or the MSE-optimal
  clip of each channel, :func:`channel_scales`).
"""

from __future__ import annotations

import numpy as np

from qsvd_export.compress.attention_stats import AttentionStats
from qsvd_export.latent_layout import LatentLayer


def _sqrt_psd(matrix: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(M^{1/2}, M^{-1/2}) of a symmetric PSD matrix with a relative ridge."""
    w, v = np.linalg.eigh(matrix)
    w = np.maximum(w, ridge * max(float(w.max()), 1e-30))
    return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def _top(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues descending, top-``rank`` eigenvectors as columns) of a symmetric matrix; signs fixed so
    each vector's largest-magnitude entry is positive (same inputs → same bytes)."""
    w, v = np.linalg.eigh(matrix)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order[:rank]]
    signs = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    return np.maximum(w, 0.0), v * np.where(signs == 0, 1.0, signs)


def _group_slice(stats: AttentionStats, groups: int, g: int) -> slice:
    width = stats.kv_heads // groups * stats.head_dim
    return slice(g * width, (g + 1) * width)


def key_metric(stats: AttentionStats, groups: int, g: int) -> np.ndarray:
    """blockdiag of the query moments of the KV heads in group ``g`` [m·D, m·D]."""
    m, d = stats.kv_heads // groups, stats.head_dim
    metric = np.zeros((m * d, m * d))
    for j in range(m):
        metric[j * d:(j + 1) * d, j * d:(j + 1) * d] = stats.query[g * m + j]
    return metric / max(stats.tokens, 1)


def value_metric(stats: AttentionStats, groups: int, g: int) -> np.ndarray:
    """blockdiag of the output-projection metrics of the KV heads in group ``g`` [m·D, m·D] (identity when
    the output projection was not found), normalized to mean eigenvalue 1."""
    m, d = stats.kv_heads // groups, stats.head_dim
    if stats.value_metric is None:
        return np.eye(m * d)
    metric = np.zeros((m * d, m * d))
    for j in range(m):
        metric[j * d:(j + 1) * d, j * d:(j + 1) * d] = stats.value_metric[g * m + j]
    return metric / max(np.trace(metric) / (m * d), 1e-30)


def _whitened(stats: AttentionStats, groups: int, g: int) -> tuple[np.ndarray, ...]:
    """(key root, key inverse root, whitened key moment, value root, value inverse root, whitened value moment)."""
    part = _group_slice(stats, groups, g)
    k_root, k_inverse = _sqrt_psd(key_metric(stats, groups, g))
    v_root, v_inverse = _sqrt_psd(value_metric(stats, groups, g))
    return (k_root, k_inverse, k_root @ stats.key[part, part] @ k_root,
            v_root, v_inverse, v_root @ stats.value[part, part] @ v_root)


def spectra(stats: AttentionStats, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) of the whitened key and value second moments, per group [G, m·D]."""
    keys, values = [], []
    for g in range(groups):
        _, _, k_moment, _, _, v_moment = _whitened(stats, groups, g)
        keys.append(np.sort(np.linalg.eigvalsh(k_moment))[::-1])
        values.append(np.sort(np.linalg.eigvalsh(v_moment))[::-1])
    return np.maximum(np.asarray(keys), 0.0), np.maximum(np.asarray(values), 0.0)


def channel_scales(latent: np.ndarray, bits: int = 8, method: str = "mse") -> np.ndarray:
    """Symmetric quantization step per column of ``latent`` [n, r]: ``absmax`` / (2^(bits-1) − 1), or the
    clip among 64 candidates (10%–100% of absmax) with the lowest mean squared error on the rows."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.maximum(np.abs(latent).max(axis=0), 1e-12)
    if method == "absmax":
        return (absmax / qmax).astype(np.float32)
    best, best_err = absmax / qmax, np.full(latent.shape[1], np.inf)
    for fraction in np.linspace(0.1, 1.0, 64):
        step = absmax * fraction / qmax
        err = ((np.clip(np.round(latent / step), -qmax - 1, qmax) * step - latent) ** 2).mean(axis=0)
        better = err < best_err
        best, best_err = np.where(better, step, best), np.where(better, err, best_err)
    return best.astype(np.float32)


def fit_latent(stats: AttentionStats, groups: int, rank: int, bits: int | None = 8,
               scale_method: str = "mse") -> LatentLayer:
    """Factors of one block for ``groups`` latent groups of rank ``rank`` each (keys and values); channel
    scales for a ``bits`` (8 or 4) cache, a float cache when None."""
    if stats.kv_heads % groups:
        raise ValueError(f"{groups} latent groups do not divide {stats.kv_heads} KV heads")
    width = stats.kv_heads // groups * stats.head_dim
    if not 1 <= rank <= width:
        raise ValueError(f"rank {rank} outside 1..{width}")
    kd, ku, vd, vu = [], [], [], []
    for g in range(groups):
        k_root, k_inverse, k_moment, v_root, v_inverse, v_moment = _whitened(stats, groups, g)
        _, e = _top(k_moment, rank)
        kd.append(e.T @ k_root)
        ku.append(k_inverse @ e)
        _, e = _top(v_moment, rank)
        vd.append(e.T @ v_root)
        vu.append(v_inverse @ e)
    kd, ku, vd, vu = (np.asarray(x, dtype=np.float32) for x in (kd, ku, vd, vu))
    key_scale = value_scale = None
    if bits is not None:
        keys, values = np.concatenate(stats.key_rows), np.concatenate(stats.value_rows)
        key_scale = np.stack([channel_scales(keys[:, _group_slice(stats, groups, g)] @ kd[g].T, bits, scale_method)
                              for g in range(groups)])
        value_scale = np.stack([channel_scales(values[:, _group_slice(stats, groups, g)] @ vd[g].T, bits, scale_method)
                                for g in range(groups)])
    layer = LatentLayer(groups, rank, kd, ku, vd, vu, key_scale, value_scale, bits)
    return layer


def allocate_ranks(stats: list[AttentionStats], groups: int, budget: float, step: int = 8,
                   minimum: int = 8) -> list[int]:
    """Per-block ranks (multiples of ``step``) whose cache width Σ 2·G·r is at most ``budget`` × the dense
    cache width Σ 2·KVH·D, chosen greedily by the largest drop in relative residual energy (whitened keys
    plus values, each as a fraction of its total) per cached value."""
    costs = []
    for stat in stats:
        keys, values = spectra(stat, groups)
        k_tail = 1.0 - np.cumsum(keys.sum(0)) / max(keys.sum(), 1e-30)
        v_tail = 1.0 - np.cumsum(values.sum(0)) / max(values.sum(), 1e-30)
        costs.append(np.concatenate([[2.0], k_tail + v_tail]))  # error at rank r = costs[r]
    limit = budget * sum(2 * s.kv_heads * s.head_dim for s in stats)
    widths = [s.kv_heads // groups * s.head_dim for s in stats]
    ranks = [min(minimum, w) for w in widths]
    used = sum(2 * groups * r for r in ranks)
    while True:
        best, gain = -1, 0.0
        for i, (cost, r) in enumerate(zip(costs, ranks)):
            nxt = min(r + step, widths[i])
            if nxt > r and used + 2 * groups * (nxt - r) <= limit:
                drop = (cost[r] - cost[nxt]) / (nxt - r)
                if drop > gain:
                    best, gain = i, drop
        if best < 0:
            return ranks
        nxt = min(ranks[best] + step, widths[best])
        used += 2 * groups * (nxt - ranks[best])
        ranks[best] = nxt
