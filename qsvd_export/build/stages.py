"""Torch-side stages the recipes share: option checks before slow work, the export preset, smoothing, and
releasing the torch model once its graph is exported."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from qsvd_export.errors import UsageError
from qsvd_export.loaded import LoadedModel


class _ReleasedModel:
    """Stands in for a released torch model: only its config stays (the bundle's metadata)."""

    def __init__(self, config: Any) -> None:
        self.config = config


def release_torch_weights(loaded: LoadedModel) -> None:
    """Once the graph is exported and the torch model is needed no more, keep only its config. Weights the
    graph reads from the model's files (``export_graph(from_files=True)``) are then never resident
    together: the write reads one at a time. Any other weight stays alive through the graph."""
    import gc

    loaded.model = _ReleasedModel(loaded.model.config)
    gc.collect()


def release_torch_model(loaded: LoadedModel, graph: ir.Model) -> None:
    """Drop the torch model once ``graph`` (exported from it) is on disk, before onnxruntime loads the saved
    copy (placement, verification): peak memory then holds one copy of the weights, not two.

    ``graph`` is emptied of its weights (its initializers wrap the torch tensors, and onnxscript's rewrite
    rules keep a reference to the last graph they matched), so it must not be used afterwards."""
    for value in graph.graph.initializers.values():
        value.const_value = None
    release_torch_weights(loaded)


def export_preset(loaded: LoadedModel, target: str) -> tuple[str | None, bool]:
    """(bits, smooth) when the user chose neither: smoothing needs the torch model, a supported family
    and calibration text, which only ``export`` has."""
    from qsvd_export.compress.smooth import SUPPORTED
    from qsvd_export.targets import policy_for

    preset = policy_for(target).smoothed_default
    if preset and loaded.tokenizer is not None and getattr(loaded.model.config, "model_type", "") in SUPPORTED:
        return preset, True
    return None, False


def smooth_for_target(loaded: LoadedModel, target: str, bits: str | None, windows: int, seed: int,
                      calibration: str = "auto") -> dict[str, Any]:
    """Smooth ``loaded`` for ``target``'s weight bits (options already checked by check_target_options), calibrated
    on ``windows`` × 512 tokens of ``calibration`` (:func:`qsvd_export.chat_calibration.smooth_calibration_windows`)."""
    import torch

    from qsvd_export.chat_calibration import resolve_smooth_calibration, smooth_calibration_windows
    from qsvd_export.compress.smooth import smooth_for_weight_bits
    from qsvd_export.targets import policy_for

    policy = policy_for(target)
    chosen = policy.bits(bits)
    assert chosen.weights is not None
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name}: no tokenizer, so no text calibration for --smooth")
    calibration = resolve_smooth_calibration(calibration, loaded.tokenizer)  # type: ignore[arg-type]
    rows = smooth_calibration_windows(loaded.model, loaded.tokenizer, calibration, windows)  # type: ignore[arg-type]
    batches = [torch.from_numpy(row[None, :]) for row in rows]
    report = smooth_for_weight_bits(loaded.model, batches, chosen.weights, policy.block_size, seed)
    return report if calibration == "wiki" else {**report, "calibration_text": calibration}


def check_rotation_options(rotate: bool, online: bool, target: str | None, bits: str | None) -> None:
    """--rotate-mlp / --rotate-o-proj (``online``) need --rotate; presets whose measured best is the other
    rotation setting get the target's note (:meth:`TargetPolicy.rotation_note`)."""
    if online and not rotate:
        raise UsageError("--rotate-mlp and --rotate-o-proj need --rotate (online rotations are part of the rotated model)")
    if target is None or bits is None:
        return
    from qsvd_export.progress import info
    from qsvd_export.targets import policy_for

    note = policy_for(target).rotation_note(bits, rotate)
    if note:
        info(note)


def check_target_options(target: str | None, bits: str | None, smooth: bool | None = None) -> None:
    """Option errors (unknown target, preset not allowed there, --bits or --smooth alone) before any slow work."""
    if target is None:
        if bits is not None:
            raise UsageError("--bits needs --target")
        if smooth:
            raise UsageError("--smooth needs --target (it scales weights for the target's weight bits)")
        return
    from qsvd_export.targets import policy_for

    chosen = policy_for(target).bits(bits)
    if smooth and chosen.weights is None:
        raise UsageError("--smooth needs an integer weight preset (--bits w4a8, w8a8, ...)")


def plain_causal_model(loaded: LoadedModel) -> bool:
    from qsvd_export.targets import plain_causal

    config = loaded.model.config
    return loaded.kind == "decoder" and plain_causal(str(getattr(config, "model_type", "")), config)

