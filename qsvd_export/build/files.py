"""Bundle files: the graph with its external data, tokenizer files, qsvd_config.json and the first report.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qsvd_export.bundle import CONFIG_NAME, GRAPH_FILE, BundleConfig, GraphSpec
from qsvd_export.loaded import LoadedModel
from qsvd_export.models import adapter_for_config


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


def generation_summary(config: Any, tokenizer: Any, chat: bool) -> dict[str, Any]:
    """Generation defaults of a language model with ``config`` (a VLM's text config) and ``tokenizer``."""
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if tokenizer is not None and tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in eos_ids:
        eos_ids.append(int(tokenizer.eos_token_id))
    return {
        "eos_token_ids": eos_ids,
        "bos_token_id": getattr(config, "bos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "chat_template": bool(chat),
        "do_sample": False,  # greedy, as `run` and samples/run_bundle.py decode
        "max_length": int(getattr(config, "max_position_embeddings", 0) or 0),
    }


def save_graph(model: ir.Model, folder: Path, filename: str = GRAPH_FILE) -> None:
    """Write ``model`` with every initializer in one external data file ``<filename>.data``."""
    ir.save(model, folder / filename, external_data=f"{filename}.data")


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """``tokenizer`` saved into ``folder``: the files written (none for one without ``save_pretrained``)."""
    if not hasattr(tokenizer, "save_pretrained"):
        return []
    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def graph_io(model: ir.Model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]  # type: ignore[misc]


def write_bundle(loaded: LoadedModel, model: ir.Model, cache: list[Any], folder: Path,
                 extra_report: dict[str, Any]) -> tuple[BundleConfig, dict[str, Any]]:
    """Write graph + data + tokenizer + HF config + qsvd_config.json into ``folder`` (already a temp folder).
    Returns the config and the report so far (sizes, then ``extra_report``); :func:`build.finish.finish_bundle`
    writes ``report.json`` once, at the end."""
    from qsvd_export.export import sync_cache_dtypes

    sync_cache_dtypes(cache, model)
    save_graph(model, folder)
    tokenizer_files = save_tokenizer(loaded.tokenizer, folder)
    from qsvd_export.runtime_files import write_hf_config

    write_hf_config(folder, loaded.model.config, loaded.kind)  # config.json + generation_config.json (optimum)
    inputs, outputs = graph_io(model)
    config = BundleConfig(
        model_name=loaded.name,
        model_type=str(loaded.model.config.model_type),
        kind=loaded.kind,
        graphs=[GraphSpec("model", GRAPH_FILE, inputs, outputs)],
        cache=cache,
        model_config=model_config_summary(loaded.model.config),
        generation=generation_summary(loaded.model.config, loaded.tokenizer, loaded.chat)
        if loaded.kind == "decoder" else {},
        tokenizer_files=tokenizer_files,
        source=loaded.source,
    )
    (folder / CONFIG_NAME).write_text(config.to_json())
    report = {
        "model": loaded.name,
        "kind": loaded.kind,
        "graph_bytes": (folder / GRAPH_FILE).stat().st_size,
        "weight_bytes": (folder / f"{GRAPH_FILE}.data").stat().st_size,
        "kv_bytes_per_token": config.kv_bytes_per_token(),
        **extra_report,
    }
    return config, report


def save_folder_tokenizer(folder: Path, out: Path) -> list[str]:
    """The tokenizer of an HF model folder saved into ``out``: the files written (none if it has none)."""
    from qsvd_export.foreign import load_tokenizer, model_folder

    found = model_folder(Path(folder))
    if not found.tokenizer:
        return []
    return save_tokenizer(load_tokenizer(found), out)


def graph_weight_bytes(folder: Path, config: BundleConfig) -> int:
    """Bytes of the external data files the bundle's graphs use (a shared file counted once)."""
    import onnx

    files: set[str] = set()
    for spec in config.graphs:
        proto = onnx.load(folder / spec.filename, load_external_data=False)
        files.update(entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                     if entry.key == "location")
    return sum((folder / name).stat().st_size for name in files)


def bundle_tokenizer_from(folder: Path) -> Any:
    """The tokenizer saved in ``folder`` (before its qsvd_config.json exists)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def plan_report(plan: Any) -> dict[str, Any]:
    """Deterministic summary of a plan: R1, R2, per-layer grouping, ranks and cache bytes (fp16)."""
    layers = []
    for layer in plan.layers:
        params, width = layer.cost()
        layers.append({
            "layer": layer.layer, "grouping": layer.grouping, "ranks": {g.members: g.rank for g in layer.groups},
            "latent_rank": layer.latent_rank, "params": params, "kv_bytes_per_token_fp16": 2 * width,
            "dense_kv_width": layer.layer_dims().dense_kv,
            "betas": {g.members: g.beta for g in layer.groups},
        })
    dense_kv = sum(2 * la.layer_dims().dense_kv for la in plan.layers)
    return {
        "model": plan.model, "budget": plan.budget, "r1": plan.r1, "r2": plan.r2, "method": plan.method,
        "calibration": plan.calibration, "kv_bytes_per_token_fp16": sum(la["kv_bytes_per_token_fp16"] for la in layers),
        "kv_bytes_per_token_dense_fp16": dense_kv, "layers": layers, "spectra": plan.spectra,
    }
