"""``qsvd-export export``: the dense bundle of a model (fp32, or quantized for a target)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsvd_export.build.evaluate import evaluate_onnx
from qsvd_export.build.files import BuildResult, graph_weight_bytes, write_bundle
from qsvd_export.build.finish import apply_target, finish_bundle, finish_target
from qsvd_export.build.kv_cache import latent_cache_layout, latent_kv_layers
from qsvd_export.build.stages import (
    check_rotation_options,
    check_target_options,
    export_preset,
    plain_causal_model,
    release_torch_model,
    release_torch_weights,
    smooth_for_target,
)
from qsvd_export.bundle import atomic_output_dir
from qsvd_export.export import export_graph
from qsvd_export.zoo import load_model

if TYPE_CHECKING:
    from qsvd_export.build.request import TargetRequest


def build_dense_bundle(spec: str, out: Path, overwrite: bool = False, seed: int = 0, rotate: bool = False,
                       rotate_mlp: bool = False, rotate_o_proj: bool = False, target: TargetRequest | None = None,
                       smooth: bool | None = None, smooth_windows: int = 16, smooth_calib: str = "auto",
                       mobile: bool = False,
                       eval_text: str | None = None, eval_windows: int = 32) -> BuildResult:
    """``qsvd-export export``: the dense bundle of ``spec`` (fp32, or quantized for ``target``).

    ``rotate``: fold the norm gains and rotate the residual stream first (H1, QuaRot; outputs unchanged);
    ``rotate_mlp``: also rotate every down_proj input online (one constant MatMul per layer);
    ``rotate_o_proj``: every o_proj input (across and within heads).
    ``smooth``: activation-aware weight scaling for the target's weight bits, calibrated on
    ``smooth_windows`` × 512 tokens (outputs unchanged in fp32) of ``smooth_calib``: auto (chat-formatted windows for
    a tokenizer with a chat template, else wiki_calib), wiki, chat or mixed (:mod:`qsvd_export.chat_calibration`). With ``target`` set and
    neither ``target.bits`` nor ``smooth`` given, the policy's export preset applies (cpu: smoothed w4a8 for
    the llama family with a tokenizer, else the plain default).
    ``target.kv``: the KV cache of the fused attention (cpu target): an absorbed latent under a KV budget and/or
    an int8 cache (:func:`latent_kv_layers`).
    """
    from qsvd_export.bundle import check_output_dir

    check_output_dir(out, overwrite)  # fail before the slow steps
    name, bits = (target.target, target.bits) if target is not None else (None, None)
    check_target_options(name, bits, smooth)
    check_rotation_options(rotate, rotate_mlp or rotate_o_proj, name, bits)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(spec, seed=seed)
    if loaded.kind == "vlm":
        from qsvd_export.build.vlm import build_vlm_bundle, check_vlm_options

        check_vlm_options(name, mobile, rotate, smooth)
        timings["load_s"] = time.perf_counter() - start
        return build_vlm_bundle(loaded, out, overwrite, timings, target=target)
    extra: dict[str, Any] = {}
    if rotate:
        from qsvd_export.compress.residual_rotation import rotate_residual_stream

        extra["residual_rotation"] = rotate_residual_stream(loaded.model, seed, online_mlp=rotate_mlp,
                                                            online_o_proj=rotate_o_proj)
    timings["load_s"] = time.perf_counter() - start
    if target is not None and bits is None and smooth is None:
        bits, smooth = export_preset(loaded, target.target)
        target = replace(target, bits=bits)
    if smooth:
        start = time.perf_counter()
        extra["smoothing"] = smooth_for_target(loaded, name, bits, smooth_windows, seed, smooth_calib)
        timings["smooth_s"] = time.perf_counter() - start
    start = time.perf_counter()
    from_files = not rotate and not smooth
    exported = export_graph(loaded, from_files=from_files)
    timings["export_s"] = time.perf_counter() - start
    parameters = int(sum(p.numel() for p in loaded.model.parameters()))
    latent = None
    kv = target.kv if target is not None else None
    if kv is not None and kv.active:
        start = time.perf_counter()
        latent, extra["latent_attention"] = latent_kv_layers(exported.model, loaded, name, kv)
        timings["latent_attention_s"] = time.perf_counter() - start
    if eval_text is None:
        release_torch_weights(loaded)
    target_report = apply_target(exported.model, target, plain_causal_model(loaded), latent)
    stage, cache = ("dense", exported.cache) if latent is None else ("latent-attention", latent_cache_layout(exported.model, latent))
    with atomic_output_dir(out, overwrite) as tmp:
        config, report = write_bundle(loaded, exported.model, cache, tmp,
                                      {"stage": stage, "parameters": parameters, **extra})
        if eval_text is None:
            release_torch_model(loaded, exported.model)
        target_report = finish_target(tmp, config, target_report, target, loaded.tokenizer, timings)
        if target_report is not None:
            report.update(target=target_report, weight_bytes=graph_weight_bytes(tmp, config))
        if eval_text is not None:
            start = time.perf_counter()
            report["perplexity"] = evaluate_onnx(loaded, tmp, eval_text, eval_windows)
            timings["eval_s"] = time.perf_counter() - start
        finish_bundle(tmp, config, report, mobile, timings)
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)

