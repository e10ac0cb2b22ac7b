"""Strict Pareto dominance: the one rule every front and every "dominated by" check of the benchmarks uses.

Points are tuples of costs, lower is better on every axis (negate an axis where higher is better, e.g.
tokens/s). ``a`` dominates ``b`` when ``a`` is ≤ ``b`` on every axis and < on at least one: a peer at
the same KV bytes with lower perplexity dominates; two rows equal on both axes do not dominate each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` ≤ ``b`` on every axis and < on at least one (costs: lower is better)."""
    if len(a) != len(b):
        raise ValueError(f"points of different dimension: {a} vs {b}")
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def dominated_by(point: Sequence[float], others: Mapping[str, Sequence[float]]) -> list[str]:
    """Names of the ``others`` that dominate ``point``, in their given order (empty: on the front)."""
    return [name for name, other in others.items() if dominates(other, point)]


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, in input order (equal points are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
