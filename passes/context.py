"""State the graph-stage passes share: the plan, the matched attention blocks, what each pass did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from qsvd_export.passes.find_attention import AttentionBlock, MatchFailure


@dataclass
class LayerRewrite:
    """What the passes did to one attention block (``report.json`` lists these)."""

    block: AttentionBlock
    latents: list[tuple[str, ir.Value]] = field(default_factory=list)  # (group members, [B, S, r] latent)
    ups: dict[str, Any] = field(default_factory=dict)  # member → (up [out, r] ndarray, bias, group members)
    latent_rank: int = 0
    cache: str = "dense"  # "dense" | "latent"
    latent_all: ir.Value | None = None  # [B, past+seq, r] after latent_kv
    rebuilt: dict[str, ir.Value] = field(default_factory=dict)  # member → K/V of all tokens, [B, Hkv, T, D]
    full_ups: dict[str, Any] = field(default_factory=dict)  # member → ([r, out] over the whole latent, bias)
    chains: dict[str, list[ir.Node]] = field(default_factory=dict)  # member → original per-token chain
    notes: list[str] = field(default_factory=list)


@dataclass
class GraphStageContext:
    plan: Any | None  # CompressionPlan
    blocks: list[AttentionBlock] = field(default_factory=list)
    failures: list[MatchFailure] = field(default_factory=list)
    layers: dict[int, LayerRewrite] = field(default_factory=dict)
    derived: dict[int, ir.Value] = field(default_factory=dict)  # memo of values re-derived for all positions
    folded_rotation: dict[str, Any] | None = None  # what fold_rotations did (None: nothing to fold)

    def report(self) -> dict[str, Any]:
        extra = {"folded_rotation": self.folded_rotation} if self.folded_rotation else {}
        return {**extra,
            "attention_blocks": len(self.blocks),
            "unmatched": [{"softmax": f.softmax, "reason": f.reason} for f in self.failures],
            "layers": [
                {"layer": i, "cache": r.cache, "latent_rank": r.latent_rank, "notes": r.notes}
                for i, r in sorted(self.layers.items())
            ],
        }
