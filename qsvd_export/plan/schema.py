"""CompressionPlan: the contract between the torch stage and the graph stage.

Files: ``plan.json`` (everything but the factors, deterministic key order) and ``plan.safetensors``
(factors, float32). Per layer, a list of factor groups; each group has ``members`` (a subset of "qkv",
in that order), a rank r, β and the latent rotation it was built with. Tensors:
``layers.{i}.{members}.down`` [r, E] and ``layers.{i}.{members}.up_{m}`` [out_m, r] for each member m,
so that member m's projection is y = (x · downᵀ) · up_mᵀ + b_m (bias kept from the dense model).
A group containing k or v is *cached*: its latent x·downᵀ [.., r] replaces K/V in the KV cache.
Members outside every group stay dense.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from qsvd_export.compress.budget import LayerDims, layer_cost
from qsvd_export.errors import BadInputError

if TYPE_CHECKING:  # factors are torch tensors from the torch stage and load_plan; the schema itself needs no torch
    import torch

PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"
PLAN_FORMAT = "qsvd-plan"
PLAN_VERSION = 1


@dataclass
class PlanGroup:
    members: str
    rank: int
    beta: float
    rotation: str = "none"

    @property
    def cached(self) -> bool:
        return "k" in self.members or "v" in self.members


PROBES = 4  # random bilinear probes per projection weight in a plan's fingerprint


def weight_probes(weight: np.ndarray) -> list[float]:
    """Fingerprint of one projection weight W [out, E]: [‖W‖_F, aᵢᵀ W bᵢ / ‖W‖_F for PROBES seeded unit
    vector pairs] (float64, 8 significant digits). Orthogonal rotations keep ‖W‖ but not the probes, so
    the pair tells a plan's weights from rotated, smoothed or other weights; fp16 rounding moves neither."""
    w = np.asarray(weight, dtype=np.float64)
    rng = np.random.default_rng(w.shape[0] * 1_000_003 + w.shape[1])
    left = rng.standard_normal((PROBES, w.shape[0]))
    right = rng.standard_normal((PROBES, w.shape[1]))
    left /= np.linalg.norm(left, axis=1, keepdims=True)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    norm = float(np.linalg.norm(w))
    probes = np.einsum("po,oe,pe->p", left, w, right) / max(norm, 1e-30)
    return [float(f"{v:.8g}") for v in [norm, *probes]]


def probes_mismatch(expected: list[float], actual: list[float], tolerance: float = 0.05) -> str | None:
    """Why ``actual`` (:func:`weight_probes` of a graph's weight) is not the weight ``expected`` was taken
    from, or None when it is (norms within 0.1%, probe vectors within ``tolerance`` of their length)."""
    norm_e, norm_a = expected[0], actual[0]
    if abs(norm_a - norm_e) > 1e-3 * max(abs(norm_e), 1e-30):
        return f"weight norm {norm_a:.6g} vs {norm_e:.6g} in the plan"
    drift = float(np.linalg.norm(np.subtract(actual[1:], expected[1:])))
    if drift > tolerance * max(float(np.linalg.norm(expected[1:])), 1e-12):
        return "same norm, different weights (rotated, smoothed or another checkpoint)"
    return None


@dataclass
class PlanLayer:
    layer: int
    dims: dict[str, int]  # e, q, k, v
    num_heads: int
    num_kv_heads: int
    head_dim: int
    groups: list[PlanGroup] = field(default_factory=list)
    # member → weight_probes of the dense weight the factors were computed from (None: plans before 2026-11-27)
    probes: dict[str, list[float]] | None = None
    # the bundle graph holding this block (VLMs: "vision" has no cache, "model" the decoder); None: one graph
    graph: str | None = None

    @property
    def grouping(self) -> str:
        if not self.groups:
            return "dense"
        return "+".join(g.members for g in self.groups)

    @property
    def latent_rank(self) -> int:
        return sum(g.rank for g in self.groups if g.cached)

    def group_of(self, member: str) -> PlanGroup | None:
        return next((g for g in self.groups if member in g.members), None)

    def layer_dims(self) -> LayerDims:
        return LayerDims(**self.dims, cached=self.graph != "vision")

    def cost(self) -> tuple[int, int]:
        """(params, cache width) by the EVAL.md cost model."""
        return layer_cost(self.layer_dims(), {g.members: g.rank for g in self.groups})


@dataclass
class CompressionPlan:
    model: str
    model_type: str
    layers: list[PlanLayer]
    budget: dict[str, float | None]
    r1: float
    r2: float
    method: dict[str, Any]  # allocation, grouping, whitening, beta, rotation, bits
    calibration: dict[str, Any]
    seed: int = 0
    # "layer.members" → {"sigma": whitened singular values ÷ the largest (4 digits), "kept": component
    # indices the allocation kept}, for the first, middle and last layer: the report's spectra plot
    spectra: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION
    tensors: "dict[str, torch.Tensor]" = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("tensors")
        for layer in data["layers"]:  # written only when set: single-graph plans stay as they were
            if layer["graph"] is None:
                del layer["graph"]
        return json.dumps(data, indent=2) + "\n"

    @staticmethod
    def tensor_name(layer: int, members: str, part: str) -> str:
        return f"layers.{layer}.{members}.{part}"

    def factor(self, layer: int, members: str, part: str) -> torch.Tensor:
        name = self.tensor_name(layer, members, part)
        if name not in self.tensors:
            raise BadInputError(f"plan has no tensor {name}")
        return self.tensors[name]


def plan_for_graph(plan: CompressionPlan, graph: str) -> CompressionPlan:
    """The layers of ``plan`` that live in bundle graph ``graph`` (a VLM plan covers two graphs), renumbered
    0… in order with their tensors, as the graph stage of that one graph expects. R1/R2 stay the whole
    plan's."""
    layers, tensors = [], {}
    for index, layer in enumerate(la for la in plan.layers if la.graph == graph):
        for group in layer.groups:
            for part in ["down", *(f"up_{m}" for m in group.members)]:
                tensors[plan.tensor_name(index, group.members, part)] = plan.factor(layer.layer, group.members, part)
        layers.append(replace(layer, layer=index, graph=None))
    if not layers:
        raise BadInputError(f"plan has no layer in graph '{graph}'")
    return replace(plan, layers=layers, tensors=tensors)
