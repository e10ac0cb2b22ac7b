"""VLM bundles: ``vision.onnx`` + ``embed.onnx`` + ``model.onnx`` (decoder), the processor, one config.

``qsvd_config.json`` lists the three graphs by role (``vision``, ``embed``, ``model``) and, under
``model_config.vlm``, how to chain them: ``image_token_id``, ``image_seq_len`` (features per frame),
``image_size`` (frame side) and the vision tower's geometry. ``runtimes/vlm.py`` drives it.
A compressed bundle's plan covers both towers (``PlanLayer.graph``); each graph gets its own layers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsvd_export.build.files import (
    BuildResult,
    generation_summary,
    graph_io,
    model_config_summary,
    save_graph,
    save_tokenizer,
)
from qsvd_export.build.finish import apply_target, finish_bundle
from qsvd_export.bundle import CONFIG_NAME, BundleConfig, GraphSpec, atomic_output_dir
from qsvd_export.errors import UsageError
from qsvd_export.loaded import LoadedModel
from qsvd_export.targets.policy import check_optimized_graph

if TYPE_CHECKING:
    from qsvd_export.build.request import TargetRequest

ROLES = {"vision": "vision.onnx", "embed": "embed.onnx", "model": "model.onnx"}


VLM_TARGETS = ("cpu", "gpu")


def check_vlm_options(target: str | None, mobile: bool, rotate: bool = False, smooth: bool | None = None) -> None:
    """Refuse what VLM bundles do not support yet, by name, before any slow step."""
    if target is not None and target not in VLM_TARGETS:
        raise UsageError(f"--target {target} is not supported for vision-language models yet "
                         f"(fp32, or {', '.join(VLM_TARGETS)})")
    for flag, given in (("--mobile", mobile), ("--rotate", rotate), ("--smooth", bool(smooth))):
        if given:
            raise UsageError(f"{flag} is not supported for vision-language models yet")


def _apply_targets(graphs: dict[str, Any], target: TargetRequest | None) -> dict[str, Any] | None:
    """The target stage on every graph (cpu: MatMulNBits weights, the embedding table at 8 bits)."""
    if target is None:
        return None
    per_graph = {role: apply_target(graphs[role].model, target) for role in ROLES}
    first = next(iter(per_graph.values()))
    return {"target": target.target, "bits": first["bits"],  # type: ignore[index]
            "quantized_matmuls": sum(r.get("quantized_matmuls", 0) for r in per_graph.values()),  # type: ignore[union-attr]
            "graphs": per_graph}


def vlm_model_config(loaded: LoadedModel) -> dict[str, Any]:
    """The bundle's ``model_config``: the language model's geometry plus ``vlm`` (how the graphs chain)."""
    from qsvd_export.models.vlm import vlm_parts

    parts = vlm_parts(loaded.model)
    vision = parts.vision_config
    return {
        **model_config_summary(parts.text_config),
        "vlm": {
            "image_token_id": parts.image_token_id,
            "image_seq_len": parts.image_seq_len,
            "image_size": parts.image_size,
            "vision_hidden_size": int(vision.hidden_size),
            "vision_layers": int(vision.num_hidden_layers),
            "vision_heads": int(vision.num_attention_heads),
        },
    }


def build_vlm_bundle(loaded: LoadedModel, out: Path, overwrite: bool, timings: dict[str, float],
                     plan: Any = None, report: dict[str, Any] | None = None,
                     target: TargetRequest | None = None) -> BuildResult:
    """Export the three graphs of ``loaded`` (from its files when unchanged), apply ``plan``'s layers to the
    vision and decoder graphs, quantize every graph for ``target``, and write the bundle atomically.
    Returns a ``BuildResult``."""
    from qsvd_export.export import cache_layout_from_graph, export_vlm, sync_cache_dtypes
    from qsvd_export.passes.chain import run_graph_stage
    from qsvd_export.plan.io import save_plan
    from qsvd_export.plan.schema import plan_for_graph
    from qsvd_export.progress import info

    start = time.perf_counter()
    graphs = export_vlm(loaded, from_files=True)
    timings["export_s"] = time.perf_counter() - start
    parameters = int(sum(p.numel() for p in loaded.model.parameters()))
    report = dict(report or {"stage": "dense"})
    cache = graphs["model"].cache
    if plan is not None:
        start = time.perf_counter()
        for role, key in (("vision", "graph_stage_vision"), ("model", "graph_stage")):
            info(f"graph stage on the {role} graph")
            report[key] = run_graph_stage(graphs[role].model, plan_for_graph(plan, role)).report()
        cache = cache_layout_from_graph(graphs["model"].model)
        report["kv_bytes_per_token_fp16_graph"] = sum(layer.bytes_per_token() // 2 for layer in cache)
        timings["graph_stage_s"] = time.perf_counter() - start
    model_config = vlm_model_config(loaded)
    target_report = _apply_targets(graphs, target)
    sync_cache_dtypes(cache, graphs["model"].model)  # the gpu target's fp16 cache
    with atomic_output_dir(out, overwrite) as tmp:
        specs = []
        for role, filename in ROLES.items():
            save_graph(graphs[role].model, tmp, filename)
            specs.append(GraphSpec(role, filename, *graph_io(graphs[role].model)))
            if target_report is not None:
                strict = target is not None and target.strict
                check_optimized_graph(tmp / filename, target_report["graphs"][role], strict)
        if plan is not None:
            save_plan(plan, tmp)
        tokenizer_files = save_tokenizer(loaded.processor, tmp)
        config = BundleConfig(
            model_name=loaded.name,
            model_type=str(loaded.model.config.model_type),
            kind="vlm",
            graphs=specs,
            cache=cache,
            model_config=model_config,
            generation=generation_summary(loaded.model.config.text_config, loaded.tokenizer,
                                          bool(getattr(loaded.processor, "chat_template", None))),
            tokenizer_files=tokenizer_files,
            source=loaded.source,
        )
        (tmp / CONFIG_NAME).write_text(config.to_json())
        finish_bundle(tmp, config, {
            "model": loaded.name, "kind": "vlm",
            "graph_bytes": sum((tmp / f).stat().st_size for f in ROLES.values()),
            "weight_bytes": sum((tmp / f"{f}.data").stat().st_size for f in ROLES.values()
                                if (tmp / f"{f}.data").exists()),
            "kv_bytes_per_token": config.kv_bytes_per_token(),
            "parameters": parameters,
            **report,
            **({"target": target_report} if target_report is not None else {}),
        }, False, timings)
    return BuildResult(Path(out), config, json.loads((Path(out) / "report.json").read_text()), timings)
