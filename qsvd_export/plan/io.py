"""Plan files: ``plan.json`` + ``plan.safetensors`` written deterministically and read back with shape checks
(no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qsvd_export.errors import BadInputError
from qsvd_export.plan.schema import PLAN_FORMAT, PLAN_JSON, PLAN_TENSORS, PLAN_VERSION, CompressionPlan, PlanGroup, PlanLayer


def save_plan(plan: CompressionPlan, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / PLAN_JSON).write_text(plan.to_json())
    tensors = {k: plan.tensors[k].to(torch.float32).contiguous() for k in sorted(plan.tensors)}
    save_file(tensors, str(folder / PLAN_TENSORS), metadata={"format": "pt"})


def load_plan(folder: Path) -> CompressionPlan:
    """Read a plan folder (no pickle: JSON + safetensors). Raises :class:`BadInputError` if malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    json_path, tensor_path = folder / PLAN_JSON, folder / PLAN_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise BadInputError(f"{folder}: not a plan folder (needs {PLAN_JSON} and {PLAN_TENSORS})")
    try:
        data = json.loads(json_path.read_text())
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise BadInputError(f"{json_path}: not a {PLAN_FORMAT} v{PLAN_VERSION} plan")
        data["layers"] = [
            PlanLayer(**{**layer, "groups": [PlanGroup(**g) for g in layer["groups"]]}) for layer in data["layers"]
        ]
        plan = CompressionPlan(**data)
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise BadInputError(f"{json_path}: malformed plan ({exc.__class__.__name__}: {exc})") from None
    try:
        plan.tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise BadInputError(f"{tensor_path}: unreadable factors ({exc})") from None
    for layer in plan.layers:
        for group in layer.groups:
            down = plan.factor(layer.layer, group.members, "down")
            if tuple(down.shape) != (group.rank, layer.dims["e"]):
                raise BadInputError(f"plan tensor {CompressionPlan.tensor_name(layer.layer, group.members, 'down')} "
                                    f"has shape {tuple(down.shape)}, expected {(group.rank, layer.dims['e'])}")
            for m in group.members:
                up = plan.factor(layer.layer, group.members, f"up_{m}")
                if tuple(up.shape) != (layer.dims[m], group.rank):
                    raise BadInputError(f"plan tensor up_{m} of layer {layer.layer} has shape {tuple(up.shape)}")
    return plan
