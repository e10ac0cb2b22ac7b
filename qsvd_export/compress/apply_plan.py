"""A plan applied to a torch model: ``LowRankLinear`` factors swapped in for the planned projections (the reference
the exported graph is checked against)."""

from __future__ import annotations

import torch
from torch import nn

from qsvd_export.errors import BadInputError
from qsvd_export.plan.schema import CompressionPlan


class LowRankLinear(nn.Module):
    """y = (x · downᵀ) · upᵀ + bias: one member of a factor group (the down-projection is shared in ONNX)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.down = nn.Parameter(down.detach().clone().float(), requires_grad=False)
        self.up = nn.Parameter(up.detach().clone().float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.down.T) @ self.up.T
        return y if self.bias is None else y + self.bias


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def apply_plan(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Replace the Q/K/V projections of ``model`` in place with the plan's factors; returns ``model``."""
    from qsvd_export.models.projections import attention_projections

    blocks = attention_projections(model)
    if len(blocks) != len(plan.layers):
        raise BadInputError(f"plan has {len(plan.layers)} layers, model has {len(blocks)} attention blocks")
    for block, layer in zip(blocks, plan.layers):
        if block.dims != layer.dims:
            raise BadInputError(f"plan layer {layer.layer} dims {layer.dims} do not match the model's {block.dims}")
        if not layer.groups:
            continue
        weights, biases = block.weights(), block.biases()
        modules = []
        for m, w, b in zip("qkv", weights, biases):
            group = layer.group_of(m)
            if group is None:
                modules.append(_dense(w, b))
            else:
                down = plan.factor(layer.layer, group.members, "down")
                modules.append(LowRankLinear(down, plan.factor(layer.layer, group.members, f"up_{m}"), b))
        block.replace(*modules)
    return model
