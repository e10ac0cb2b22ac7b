"""Orchestration: load → export → write a bundle (atomically)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qsvd_export.bundle import CONFIG_NAME, BundleConfig, GraphSpec, atomic_output_dir, write_json
from qsvd_export.export import ExportedGraph, export_graph
from qsvd_export.models import adapter_for_config
from qsvd_export.zoo import LoadedModel, load_model

GRAPH_FILE = "model.onnx"


@dataclass
class BuildResult:
    out: Path
    config: BundleConfig | None
    report: dict[str, Any]
    timings: dict[str, float]


def model_config_summary(config: Any) -> dict[str, Any]:
    adapter = adapter_for_config(config)
    summary: dict[str, Any] = {
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": adapter.num_layers(config),
        "num_attention_heads": adapter.num_heads(config),
    }
    if adapter.kind == "decoder":
        summary.update(
            num_key_value_heads=adapter.num_kv_heads(config),
            head_dim=adapter.head_dim(config),
            vocab_size=int(config.vocab_size),
            context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        )
    return summary


def generation_summary(loaded: LoadedModel) -> dict[str, Any]:
    config = loaded.model.config
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    tokenizer = loaded.tokenizer
    if tokenizer is not None and tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in eos_ids:
        eos_ids.append(int(tokenizer.eos_token_id))
    return {
        "eos_token_ids": eos_ids,
        "bos_token_id": getattr(config, "bos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "chat_template": bool(loaded.chat),
    }


def save_graph(model: ir.Model, folder: Path, filename: str = GRAPH_FILE) -> None:
    """Write ``model`` with every initializer in one external data file ``<filename>.data``."""
    ir.save(model, folder / filename, external_data=f"{filename}.data")


def save_tokenizer(loaded: LoadedModel, folder: Path) -> list[str]:
    if loaded.tokenizer is None:
        return []
    before = {p.name for p in folder.iterdir()}
    loaded.tokenizer.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def write_bundle(loaded: LoadedModel, exported: ExportedGraph, folder: Path, extra_report: dict[str, Any]) -> BundleConfig:
    """Write graph + data + tokenizer + config + report into ``folder`` (already a temp folder)."""
    save_graph(exported.model, folder)
    tokenizer_files = save_tokenizer(loaded, folder)
    config = BundleConfig(
        model_name=loaded.name,
        model_type=str(loaded.model.config.model_type),
        kind=loaded.kind,
        graphs=[GraphSpec("model", GRAPH_FILE, exported.inputs, exported.outputs)],
        cache=exported.cache,
        model_config=model_config_summary(loaded.model.config),
        generation=generation_summary(loaded) if loaded.kind == "decoder" else {},
        tokenizer_files=tokenizer_files,
        source=loaded.source,
    )
    (folder / CONFIG_NAME).write_text(config.to_json())
    report = {
        "model": loaded.name,
        "kind": loaded.kind,
        "graph_bytes": (folder / GRAPH_FILE).stat().st_size,
        "weight_bytes": (folder / f"{GRAPH_FILE}.data").stat().st_size,
        "parameters": int(sum(p.numel() for p in loaded.model.parameters())),
        "kv_bytes_per_token": config.kv_bytes_per_token(),
        **extra_report,
    }
    write_json(folder / "report.json", report)
    return config


def build_dense_bundle(spec: str, out: Path, overwrite: bool = False, seed: int = 0) -> BuildResult:
    """``qsvd-export export``: the dense fp32 bundle of ``spec``."""
    from qsvd_export.bundle import check_output_dir

    check_output_dir(out, overwrite)  # fail before the slow steps
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(spec, seed=seed)
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    exported = export_graph(loaded)
    timings["export_s"] = time.perf_counter() - start
    with atomic_output_dir(out, overwrite) as tmp:
        config = write_bundle(loaded, exported, tmp, {"stage": "dense"})
        write_json(tmp / "timings.json", {k: round(v, 3) for k, v in timings.items()})
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)


def plan_report(plan: Any) -> dict[str, Any]:
    """Deterministic summary of a plan: R1, R2, per-layer grouping, ranks and cache bytes (fp16)."""
    layers = []
    for layer in plan.layers:
        params, width = layer.cost()
        layers.append({
            "layer": layer.layer, "grouping": layer.grouping, "ranks": {g.members: g.rank for g in layer.groups},
            "latent_rank": layer.latent_rank, "params": params, "kv_bytes_per_token_fp16": 2 * width,
            "betas": {g.members: g.beta for g in layer.groups},
        })
    dense_kv = sum(2 * (la.dims["k"] + la.dims["v"]) for la in plan.layers)
    return {
        "model": plan.model, "budget": plan.budget, "r1": plan.r1, "r2": plan.r2, "method": plan.method,
        "calibration": plan.calibration, "kv_bytes_per_token_fp16": sum(la["kv_bytes_per_token_fp16"] for la in layers),
        "kv_bytes_per_token_dense_fp16": dense_kv, "layers": layers,
    }


def build_plan_folder(spec: str, options: Any, out: Path, overwrite: bool = False,
                      eval_text: str | None = None, eval_windows: int = 32) -> BuildResult:
    """``qsvd-export compress``: the torch stage; writes plan.json, plan.safetensors and report.json."""
    import copy

    from qsvd_export.bundle import check_output_dir
    from qsvd_export.compress.compressor import compress_model, options_summary
    from qsvd_export.plan import apply_plan, save_plan

    check_output_dir(out, overwrite)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(spec, seed=options.seed)
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = compress_model(loaded, options)
    timings["compress_s"] = time.perf_counter() - start
    report = plan_report(plan)
    report["options"] = options_summary(options)
    if eval_text is not None:
        from qsvd_export.data import read_text, token_windows
        from qsvd_export.evaluate import torch_window_nlls
        from qsvd_export.progress import bar
        from qsvd_export.runtimes.metrics import perplexity

        start = time.perf_counter()
        rows = token_windows(loaded.tokenizer, read_text(eval_text), 512, eval_windows, source=eval_text)
        progress = bar(2 * len(rows), "perplexity (torch)")
        dense = perplexity(torch_window_nlls(loaded.model, rows, progress.update))
        compressed_model = apply_plan(copy.deepcopy(loaded.model), plan)
        compressed = perplexity(torch_window_nlls(compressed_model, rows, progress.update))
        progress.close()
        timings["eval_s"] = time.perf_counter() - start
        report["perplexity"] = {"text": eval_text, "windows": len(rows), "length": 512,
                                "dense": round(dense, 4), "compressed": round(compressed, 4)}
    with atomic_output_dir(out, overwrite) as tmp:
        save_plan(plan, tmp)
        write_json(tmp / "report.json", report)
        write_json(tmp / "timings.json", {k: round(v, 3) for k, v in timings.items()})
    return BuildResult(Path(out), None, report, timings)
