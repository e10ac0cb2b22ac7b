"""Budgets and the cost model (EVAL.md): R1 = compressed Q/K/V weight parameters ÷ dense,
R2 = KV-cache width per token ÷ dense K+V width (equal dtype), both as ratios of sums over layers.

Per layer with input width E and output widths (q, k, v):
- dense: params E(q+k+v), cache k+v.
- a factor group over members M with rank r: params r(E + Σ_{m∈M} out_m); it is cached (adds r to the
  cache width) iff M contains k or v. Members outside every group stay dense.
- a layer without a cache (a VLM's vision encoder: ``LayerDims.cached`` false) adds parameters only; R2
  sums over the cached layers.
Biases are identical on both sides and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from qsvd_export.errors import UsageError


@dataclass(frozen=True)
class Budget:
    kv: float | None = None  # R2 ceiling
    params: float | None = None  # R1 ceiling

    def describe(self) -> str:
        parts = [f"kv={self.kv:g}" if self.kv is not None else "", f"params={self.params:g}" if self.params is not None else ""]
        return ",".join(p for p in parts if p)


def parse_budget(text: str) -> Budget:
    """``kv=0.5``, ``params=0.8`` or ``params=0.8,kv=0.75`` → :class:`Budget` (ratios in (0, 1])."""
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in ("kv", "params"):
            raise UsageError(f"invalid budget '{text}': use kv=R2 and/or params=R1, e.g. kv=0.5 or params=0.8,kv=0.75")
        if key in values:
            raise UsageError(f"invalid budget '{text}': '{key}' given twice")
        try:
            ratio = float(value)
        except ValueError:
            raise UsageError(f"invalid budget '{text}': '{value}' is not a number") from None
        if not 0.0 < ratio <= 1.0:
            raise UsageError(f"invalid budget '{text}': {key} must be in (0, 1], got {value}")
        values[key] = ratio
    return Budget(kv=values.get("kv"), params=values.get("params"))


@dataclass(frozen=True)
class LayerDims:
    e: int
    q: int
    k: int
    v: int
    cached: bool = True  # False: no KV cache (a VLM's vision tower): parameters only

    def out(self, member: str) -> int:
        return {"q": self.q, "k": self.k, "v": self.v}[member]

    @property
    def dense_params(self) -> int:
        return self.e * (self.q + self.k + self.v)

    @property
    def dense_kv(self) -> int:
        return self.k + self.v if self.cached else 0

    def group_params_per_rank(self, members: str) -> int:
        return self.e + sum(self.out(m) for m in members)


def is_cached(members: str) -> bool:
    return "k" in members or "v" in members


def layer_cost(dims: LayerDims, groups: dict[str, int]) -> tuple[int, int]:
    """(params, cache width) of a layer whose factor groups are ``{members: rank}``."""
    covered = "".join(groups)
    params = sum(rank * dims.group_params_per_rank(m) for m, rank in groups.items())
    params += sum(dims.e * dims.out(m) for m in "qkv" if m not in covered)
    if not dims.cached:
        return params, 0
    width = sum(rank for m, rank in groups.items() if is_cached(m))
    width += sum(dims.out(m) for m in "kv" if m not in covered)
    return params, width


def ratios(dims: list[LayerDims], layers: list[dict[str, int]]) -> tuple[float, float]:
    """(R1, R2) of a whole model."""
    costs = [layer_cost(d, g) for d, g in zip(dims, layers)]
    r1 = sum(c[0] for c in costs) / sum(d.dense_params for d in dims)
    r2 = sum(c[1] for c in costs) / sum(d.dense_kv for d in dims)
    return r1, r2


def within(budget: Budget, r1: float, r2: float, eps: float = 1e-9) -> bool:
    return (budget.kv is None or r2 <= budget.kv + eps) and (budget.params is None or r1 <= budget.params + eps)
