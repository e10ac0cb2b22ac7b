"""Rank (and grouping) allocation across layers under one global budget.

Every candidate factorization of a layer ("qkv", "kv", "q", "k", "v": the whitened SVD of that joint
weight) comes with per-component importance scores (the estimated loss increase when the component is
dropped). A layer *choice* maps factor groups to the component indices they keep; members outside
every group stay dense.

- :func:`allocate_qsvd` (ours): the paper's global importance ranking generalized to per-layer grouping
  and a joint (params, KV) budget. Lagrangian relaxation: with prices λ per cached latent channel and μ
  per parameter, each layer independently picks the grouping and components minimising
  lost importance + λ·cache width + μ·params; λ and μ are searched so the budgets hold, then the slack
  is filled greedily by importance.
- :func:`allocate_uniform`: one rank for every layer, top singular values (the common baseline).
- :func:`allocate_fisher`: rank ∝ the layer's gradient Fisher information (Palu-style), top singular values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qsvd_export.compress.budget import Budget, LayerDims, layer_cost, ratios, within
from qsvd_export.errors import UsageError

Choice = dict[str, np.ndarray]  # factor group members → kept component indices (ascending)

GROUPINGS = ("auto", "qkv", "kv", "separate")


@dataclass
class LayerScores:
    dims: LayerDims
    importance: dict[str, np.ndarray]  # candidate group → [m] importance, aligned with σ-descending order
    fisher: dict[str, float]  # candidate group → mean squared gradient norm


def _ranks(choice: Choice) -> dict[str, int]:
    return {m: len(idx) for m, idx in choice.items()}


def _totals(layers: list[LayerScores], choices: list[Choice]) -> tuple[float, float]:
    return ratios([s.dims for s in layers], [_ranks(c) for c in choices])


def _keep(importance: np.ndarray, price: float, min_rank: int) -> np.ndarray:
    keep = np.flatnonzero(importance > price)
    if len(keep) < min_rank:
        keep = np.sort(np.argsort(-importance, kind="stable")[:min_rank])
    return keep


def _group_lagrangian(importance: np.ndarray, price: float, min_rank: int) -> tuple[float, np.ndarray]:
    keep = _keep(importance, price, min_rank)
    lost = importance.sum() - importance[keep].sum()
    return float(lost + len(keep) * price), keep


def _best_choice(s: LayerScores, lam: float, mu: float, grouping: str, min_rank: int) -> tuple[float, Choice]:
    d = s.dims
    if not d.cached:  # no cache to price; without a parameter price, dense costs nothing and loses nothing
        if mu == 0:
            return 0.0, {}
        lam = 0.0
    options: list[tuple[float, Choice]] = []
    if grouping in ("auto", "qkv"):
        cost, keep = _group_lagrangian(s.importance["qkv"], lam + mu * d.group_params_per_rank("qkv"), min_rank)
        options.append((cost, {"qkv": keep}))
    if grouping in ("auto", "kv"):
        kv_parts: list[tuple[float, Choice]] = []
        if grouping == "auto":
            kv_parts.append((lam * d.dense_kv + mu * d.e * d.dense_kv, {}))
        cost, keep = _group_lagrangian(s.importance["kv"], lam + mu * d.group_params_per_rank("kv"), min_rank)
        kv_parts.append((cost, {"kv": keep}))
        q_parts: list[tuple[float, Choice]] = [(mu * d.e * d.q, {})]
        if grouping == "auto" and mu > 0:
            cost, keep = _group_lagrangian(s.importance["q"], mu * d.group_params_per_rank("q"), min_rank)
            q_parts.append((cost, {"q": keep}))
        for kv_cost, kv_choice in kv_parts:
            for q_cost, q_choice in q_parts:
                options.append((kv_cost + q_cost, {**kv_choice, **q_choice}))
    best = options[0]
    for option in options[1:]:
        if option[0] < best[0] * (1 - 1e-12) - 1e-300:
            best = option
    return best


def _solve(layers: list[LayerScores], lam: float, mu: float, grouping: str, min_rank: int) -> tuple[float, list[Choice]]:
    total, choices = 0.0, []
    for s in layers:
        cost, choice = _best_choice(s, lam, mu, grouping, min_rank)
        total += cost
        choices.append(choice)
    return total, choices


def _lost_importance(layers: list[LayerScores], choices: list[Choice]) -> float:
    lost = 0.0
    for s, choice in zip(layers, choices):
        for members, keep in choice.items():
            imp = s.importance[members]
            lost += float(imp.sum() - imp[keep].sum())
    return lost


def _cached(dims: LayerDims, members: str) -> bool:
    return bool(dims.cached and ("k" in members or "v" in members))


def _add_within_budget(layers: list[LayerScores], choices: list[Choice], budget: Budget,
                       additions: list[tuple[int, str, np.ndarray]]) -> list[Choice]:
    """``choices`` with each of ``additions`` (layer, group, component indices), taken in order, added where the
    budget still holds after it."""
    choices = [dict(c) for c in choices]
    r1, r2 = _totals(layers, choices)
    dense_p = sum(s.dims.dense_params for s in layers)
    dense_kv = sum(s.dims.dense_kv for s in layers)
    for li, members, add in additions:
        d = layers[li].dims
        add_p = len(add) * d.group_params_per_rank(members) / dense_p
        add_kv = len(add) * (1.0 if _cached(d, members) else 0.0) / dense_kv
        if within(budget, r1 + add_p, r2 + add_kv):
            choices[li][members] = np.sort(np.concatenate([choices[li][members], add]))
            r1, r2 = r1 + add_p, r2 + add_kv
    return choices


def _fill_slack(layers: list[LayerScores], choices: list[Choice], budget: Budget) -> list[Choice]:
    """Add back dropped components, most important first, while the budget still holds."""
    candidates = []
    for li, (s, choice) in enumerate(zip(layers, choices)):
        for members, keep in choice.items():
            dropped = np.setdiff1d(np.arange(len(s.importance[members])), keep)
            candidates += [(float(s.importance[members][i]), li, members, int(i)) for i in dropped]
    candidates.sort(key=lambda c: -c[0])
    return _add_within_budget(layers, choices, budget,
                              [(li, members, np.asarray([i])) for _, li, members, i in candidates])


def round_cached_ranks(layers: list[LayerScores], choices: list[Choice], budget: Budget, multiple: int,
                       min_rank: int = 1) -> list[Choice]:
    """Every cached latent rank made a multiple of ``multiple`` (the 4-bit cache packs two channels per byte, genai's
    key/value view splits the latent in halves: an odd rank costs a padding channel). Each odd group first drops its
    least important kept components down to the multiple (the budget still holds; not below ``min_rank``), then the freed slack is given
    back in whole steps of ``multiple`` components, most important step first, while the budget holds (a group that
    could not drop, being at ``min_rank``, is rounded up first when the budget allows)."""
    if multiple <= 1:
        return choices
    choices = [dict(c) for c in choices]
    for s, choice in zip(layers, choices):
        for members, keep in choice.items():
            extra = len(keep) % multiple
            if _cached(s.dims, members) and extra and len(keep) - extra >= max(multiple, min_rank):
                imp = s.importance[members]
                choice[members] = np.sort(keep[np.argsort(imp[keep], kind="stable")[extra:]])
    steps = []
    for li, (s, choice) in enumerate(zip(layers, choices)):
        for members, keep in choice.items():
            if not _cached(s.dims, members):
                continue
            need = multiple - len(keep) % multiple  # a whole step, or what a group left below the multiple lacks
            dropped = np.setdiff1d(np.arange(len(s.importance[members])), keep)
            dropped = dropped[np.argsort(-s.importance[members][dropped], kind="stable")][:need]
            if len(dropped) == need:
                steps.append((need == multiple, -float(s.importance[members][dropped].sum()), li, members, dropped))
    steps.sort(key=lambda step: step[:2])  # unrounded groups first
    return _add_within_budget(layers, choices, budget, [(li, members, add) for _, _, li, members, add in steps])


def _price_range(layers: list[LayerScores]) -> tuple[float, float]:
    values = np.concatenate([v for s in layers for v in s.importance.values()])
    positive = values[values > 0]
    if len(positive) == 0:
        return 1e-30, 1.0
    return float(positive.min()) * 1e-3, float(positive.max()) * 1e3


def _min_feasible_lambda(layers, mu, grouping, min_rank, budget, lo, hi):  # type: ignore[no-untyped-def]
    """Smallest λ (log bisection) whose solution meets the KV budget at price μ; None if none does."""
    def feasible(lam: float) -> tuple[bool, list[Choice]]:
        _, choices = _solve(layers, lam, mu, grouping, min_rank)
        r1, r2 = _totals(layers, choices)
        return (budget.kv is None or r2 <= budget.kv + 1e-12), choices

    ok, choices = feasible(0.0)
    if ok:
        return 0.0, choices
    ok, choices = feasible(hi)
    if not ok:
        return None, choices
    a, b, best = math.log(lo), math.log(hi), choices
    for _ in range(48):
        mid = (a + b) / 2
        ok, choices = feasible(math.exp(mid))
        if ok:
            b, best = mid, choices
        else:
            a = mid
    return math.exp(b), best


def allocate_qsvd(layers: list[LayerScores], budget: Budget, grouping: str = "auto", min_rank: int = 8,
                  rank_multiple: int = 1) -> list[Choice]:
    """Importance-driven allocation with per-layer grouping under ``budget`` (see module docstring); cached
    latent ranks rounded to ``rank_multiple`` (:func:`round_cached_ranks`)."""
    if grouping not in ("auto", "qkv", "kv"):
        raise UsageError(f"grouping '{grouping}' is not available with gradient allocation (auto, qkv, kv)")
    lo, hi = _price_range(layers)
    per_param = 1.0 / max(s.dims.group_params_per_rank("qkv") for s in layers)
    if budget.params is None:
        mus = [0.0]
    else:
        mus = [0.0] + list(np.exp(np.linspace(math.log(lo * per_param), math.log(hi * per_param), 40)))
    best: tuple[float, list[Choice]] | None = None
    for mu in mus:
        lam, choices = _min_feasible_lambda(layers, mu, grouping, min_rank, budget, lo, hi)
        if lam is None:
            continue
        r1, r2 = _totals(layers, choices)
        if not within(budget, r1, r2):
            continue
        choices = round_cached_ranks(layers, _fill_slack(layers, choices, budget), budget, rank_multiple, min_rank)
        lost = _lost_importance(layers, choices)
        if best is None or lost < best[0]:
            best = (lost, choices)
    if best is None:
        raise UsageError(f"budget {budget.describe()} cannot be met with grouping '{grouping}' and min rank {min_rank}")
    return best[1]


def _uniform_choice(s: LayerScores, grouping: str, rank: int) -> Choice:
    groups = {"qkv": ("qkv",), "kv": ("kv",), "separate": ("k", "v")}[grouping]
    return {g: np.arange(min(rank, len(s.importance[g]))) for g in groups}


def _max_scale(layers: list[LayerScores], budget: Budget, make, hi: int) -> list[Choice]:  # type: ignore[no-untyped-def]
    """Largest integer t in [1, hi] for which ``make(t)`` (monotone in t) meets the budget."""
    lo = 1
    if not within(budget, *_totals(layers, make(lo))):
        raise UsageError(f"budget {budget.describe()} cannot be met even at the smallest ranks")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if within(budget, *_totals(layers, make(mid))):
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def allocate_uniform(layers: list[LayerScores], budget: Budget, grouping: str) -> list[Choice]:
    """The same rank in every layer (top singular values): the largest one that meets ``budget``."""
    if grouping not in ("qkv", "kv", "separate"):
        raise UsageError(f"uniform allocation needs grouping qkv, kv or separate (got '{grouping}')")
    widest = max(len(v) for s in layers for v in s.importance.values())
    return _max_scale(layers, budget, lambda r: [_uniform_choice(s, grouping, r) for s in layers], widest)


def allocate_fisher(layers: list[LayerScores], budget: Budget, grouping: str, min_rank: int = 8) -> list[Choice]:
    """Rank ∝ the group's Fisher information per layer (Palu-style), top singular values."""
    if grouping not in ("qkv", "kv"):
        raise UsageError(f"fisher allocation needs grouping qkv or kv (got '{grouping}')")
    fisher = np.asarray([s.fisher[grouping] for s in layers])
    weights = fisher / fisher.mean() if fisher.mean() > 0 else np.ones_like(fisher)

    resolution = 16  # rank_l = t * w_l / resolution, so small weights still get distinct ranks

    def make(t: int) -> list[Choice]:
        out = []
        for s, w in zip(layers, weights):
            rank = int(np.clip(round(t * w / resolution), min_rank, len(s.importance[grouping])))
            out.append({grouping: np.arange(rank)})
        return out

    widest = max(len(s.importance[grouping]) for s in layers)
    return _max_scale(layers, budget, make, int(resolution * widest / max(weights.min(), 1e-6)) + 1)


def choice_cost(dims: LayerDims, choice: Choice) -> tuple[int, int]:
    return layer_cost(dims, _ranks(choice))
