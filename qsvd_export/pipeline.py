"""Orchestration: load → export → write a bundle (atomically)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qsvd_export.bundle import CONFIG_NAME, BundleConfig, GraphSpec, atomic_output_dir, bundle_tokenizer, write_json
from qsvd_export.errors import UsageError
from qsvd_export.export import export_graph
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
                 extra_report: dict[str, Any]) -> BundleConfig:
    """Write graph + data + tokenizer + config + report into ``folder`` (already a temp folder)."""
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
    write_json(folder / "report.json", report)
    return config


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


def build_dense_bundle(spec: str, out: Path, overwrite: bool = False, seed: int = 0, rotate: bool = False,
                       rotate_mlp: bool = False, rotate_o_proj: bool = False,
                       target: str | None = None, bits: str | None = None, strict: bool = False,
                       smooth: bool | None = None, smooth_windows: int = 16, npu_options: Any = None,
                       verify: bool = True, mobile: bool = False, kv: "KvCacheOptions | None" = None,
                       eval_text: str | None = None, eval_windows: int = 32) -> BuildResult:
    """``qsvd-export export``: the dense bundle of ``spec`` (fp32, or quantized for ``target``).

    ``rotate``: fold the norm gains and rotate the residual stream first (H1, QuaRot; outputs unchanged);
    ``rotate_mlp``: also rotate every down_proj input online (one constant MatMul per layer);
    ``rotate_o_proj``: every o_proj input (across and within heads).
    ``smooth``: activation-aware weight scaling for the target's weight bits, calibrated on
    ``smooth_windows`` × 512 tokens of wiki_calib (outputs unchanged in fp32). With ``target`` set and
    neither ``bits`` nor ``smooth`` given, the policy's export preset applies (cpu: smoothed w4a8 for
    the llama family with a tokenizer, else the plain default).
    ``kv``: the KV cache of the fused attention (cpu target): an absorbed latent under a KV budget and/or
    an int8 cache (:func:`latent_kv_layers`).
    """
    from qsvd_export.bundle import check_output_dir

    check_output_dir(out, overwrite)  # fail before the slow steps
    _check_target_options(target, bits, smooth)
    _check_rotation_options(rotate, rotate_mlp or rotate_o_proj, target, bits)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(spec, seed=seed)
    if loaded.kind == "vlm":
        from qsvd_export.vlm_bundle import build_vlm_bundle, check_vlm_options

        check_vlm_options(target, mobile, rotate, smooth)
        timings["load_s"] = time.perf_counter() - start
        return build_vlm_bundle(loaded, out, overwrite, timings, target=target, bits=bits, strict=strict)
    extra: dict[str, Any] = {}
    if rotate:
        from qsvd_export.compress.residual_rotation import rotate_residual_stream

        extra["residual_rotation"] = rotate_residual_stream(loaded.model, seed, online_mlp=rotate_mlp,
                                                            online_o_proj=rotate_o_proj)
    timings["load_s"] = time.perf_counter() - start
    if target is not None and bits is None and smooth is None:
        bits, smooth = _export_preset(loaded, target)
    if smooth:
        start = time.perf_counter()
        extra["smoothing"] = _smooth(loaded, target, bits, smooth_windows, seed)
        timings["smooth_s"] = time.perf_counter() - start
    start = time.perf_counter()
    from_files = not rotate and not smooth
    exported = export_graph(loaded, from_files=from_files)
    timings["export_s"] = time.perf_counter() - start
    parameters = int(sum(p.numel() for p in loaded.model.parameters()))
    latent = None
    if kv is not None and kv.active:
        start = time.perf_counter()
        latent, extra["latent_attention"] = latent_kv_layers(exported.model, loaded, target, kv)
        timings["latent_attention_s"] = time.perf_counter() - start
    if eval_text is None:
        release_torch_weights(loaded)
    target_report = apply_target(exported.model, target, bits, _plain_causal(loaded), latent)
    stage, cache = ("dense", exported.cache) if latent is None else ("latent-attention", latent_cache_layout(exported.model, latent))
    with atomic_output_dir(out, overwrite) as tmp:
        config = write_bundle(loaded, exported.model, cache, tmp,
                              {"stage": stage, "parameters": parameters, **extra})
        if eval_text is None:
            release_torch_model(loaded, exported.model)
        target_report = finish_target(tmp, config, target_report, strict, loaded.tokenizer, npu_options, verify,
                                      timings)
        report = json.loads((tmp / "report.json").read_text())
        if target_report is not None:
            report.update(target=target_report, weight_bytes=graph_weight_bytes(tmp, config))
        if eval_text is not None:
            start = time.perf_counter()
            report["perplexity"] = _evaluate_onnx(loaded, tmp, eval_text, eval_windows)
            timings["eval_s"] = time.perf_counter() - start
        write_json(tmp / "report.json", report)
        _finish_bundle(tmp, config, mobile, timings)
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)


@dataclass(frozen=True)
class KvCacheOptions:
    """The KV cache of fused attention: ``budget`` (cached values ÷ dense, None = keep every value),
    ``bits`` (8 = int8, 4 = int4 codes packed in uint8, with static per-channel scales; None = float), ``groups`` (latent groups per
    block, None = one per KV head), calibrated on ``calib_windows`` × 512 tokens of ``calib_text``."""

    budget: float | None = None
    bits: int | None = None
    groups: int | None = None
    calib_windows: int = 32
    calib_text: str = "wiki_calib"

    @property
    def active(self) -> bool:
        return self.budget is not None or self.bits is not None

    def check(self, target: str | None) -> None:
        if not self.active:
            return
        if target != "cpu":
            raise UsageError(f"--kv-bits and a KV budget on fused attention need --target cpu (got {target or 'none'})")
        if self.bits not in (None, 8, 4):
            raise UsageError(f"--kv-bits {self.bits} is not available (cpu: 8 or 4, or 32 for a float cache)")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise UsageError(f"KV budget must be in (0, 1], got {self.budget}")
        if self.groups is not None and self.groups < 1:
            raise UsageError(f"--latent-groups must be at least 1, got {self.groups}")
        if self.calib_windows < 1:
            raise UsageError(f"--calib-windows is too small ({self.calib_windows})")


def latent_kv_layers(model: ir.Model, loaded: LoadedModel, target: str | None,
                     kv: KvCacheOptions) -> tuple[dict[int, Any], dict[str, Any]]:
    """Per fusable attention block the cache layout ``kv`` asks for, calibrated by running ``model`` in ONNX
    Runtime on the model's tokenizer windows (:func:`qsvd_export.compress.latent_attention.plan_latent_attention`)."""
    from qsvd_export.compress.latent_attention import plan_latent_attention
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.progress import info

    kv.check(target)
    if not _plain_causal(loaded):
        raise UsageError(f"{loaded.name}: a latent or int8 KV cache runs in fused GroupQueryAttention, which takes "
                         "plain causal decoders only (llama, qwen2/qwen3 without sliding windows)")
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name}: no tokenizer, so no calibration text for the KV cache")
    windows = token_windows(loaded.tokenizer, read_text(kv.calib_text), 512, kv.calib_windows, source=kv.calib_text)
    info(f"KV cache: {'budget ' + str(kv.budget) if kv.budget is not None else 'dense'}, "
         f"{kv.bits or 32}-bit, calibrated on {kv.calib_windows} x 512 tokens")
    return plan_latent_attention(model, windows, kv.budget, kv.groups, kv.bits)


def latent_cache_layout(model: ir.Model, latent: dict[int, Any]) -> list[Any]:
    """The cache entries of a graph whose fused attention reads ``latent`` layouts: read off its I/O, each
    layer with a latent (factors, not the identity) marked ``latent`` with its rank."""
    from qsvd_export.export import cache_layout_from_graph

    layers = cache_layout_from_graph(model)
    for layer, layout in zip(layers, (latent[i] for i in sorted(latent))):
        if layout.key_down is not None:
            layer.kind, layer.rank = "latent", layout.rank
    return layers


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


def build_compressed_bundle(spec: str, options: Any, out: Path, overwrite: bool = False,
                            eval_text: str | None = None, eval_windows: int = 32,
                            dump_dir: Path | None = None, dense_graph: Path | None = None,
                            target: str | None = None, target_bits: str | None = None,
                            target_strict: bool = False, npu_options: Any = None, verify: bool = True,
                            mobile: bool = False, kv: KvCacheOptions | None = None) -> BuildResult:
    """``qsvd-export compress``: torch stage → dense export → graph stage → bundle (graph + plan + report).

    ``dense_graph``: an existing dense export of the same model (e.g. a dense bundle's model.onnx) to
    start the graph stage from instead of exporting again. ``kv``: the KV budget as the cpu target meets it
    for plain causal decoders with a KV-only budget: absorbed latent attention planned on the dense graph
    (:func:`latent_kv_layers`), no torch stage.
    """
    from qsvd_export.bundle import check_output_dir
    from qsvd_export.compress.compressor import compress_model, options_summary
    from qsvd_export.export import cache_layout_from_graph
    from qsvd_export.passes.chain import run_graph_stage
    from qsvd_export.plan import save_plan
    from qsvd_export.progress import info

    check_output_dir(out, overwrite)
    _check_target_options(target, target_bits)
    _check_rotation_options(options.residual_rotation, options.rotate_mlp or options.rotate_o_proj, target,
                            target_bits)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(spec, seed=options.seed)
    if options.calib_images is not None and loaded.kind != "vlm":
        raise UsageError(f"{loaded.name} is a {loaded.kind} model: --calib-images is for vision-language models "
                         "(vision graphs: qsvd-export GRAPH.onnx --budget B --calib-images DIR)")
    if loaded.kind == "vlm":
        return _build_compressed_vlm_bundle(loaded, options, out, overwrite, timings, start, dense_graph, target,
                                            target_bits, target_strict, mobile, eval_text)
    if kv is not None and _absorbed_kv(loaded, options, target, dense_graph):
        del loaded
        return build_dense_bundle(spec, out, overwrite, options.seed, target=target, bits=target_bits,
                                  strict=target_strict, npu_options=npu_options, verify=verify, mobile=mobile,
                                  kv=kv, eval_text=eval_text, eval_windows=eval_windows)
    rotation_report: dict[str, Any] = {}
    if options.residual_rotation:
        if dense_graph is not None:
            raise UsageError("residual rotation changes the weights: it cannot start from an existing dense graph")
        from qsvd_export.compress.residual_rotation import rotate_residual_stream

        rotation_report["residual_rotation"] = rotate_residual_stream(loaded.model, options.seed,
                                                                      online_mlp=options.rotate_mlp,
                                                                      online_o_proj=options.rotate_o_proj)
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    # on a GPU, the model then comes back by reloading (lazy, memory-mapped) instead of a full host copy
    reload = None if options.residual_rotation else (lambda: load_model(spec, seed=options.seed).model)
    plan = compress_model(loaded, options, reload=reload)
    if rotation_report:  # the factors live in the rotated basis: a graph needs the same rotation
        plan.method["residual_rotation"] = rotation_report["residual_rotation"]
    timings["compress_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if dense_graph is not None:
        from qsvd_export.onnx_io import load_onnx

        graph = load_onnx(dense_graph)
    else:
        info("exporting the dense graph")
        graph = export_graph(loaded, from_files=not options.residual_rotation).model
        if eval_text is None:
            release_torch_weights(loaded)
    timings["export_s"] = time.perf_counter() - start
    info("graph stage: find_attention → split_qkv → latent_kv → fold_value → absorb_key → cleanup")
    start = time.perf_counter()
    context = run_graph_stage(graph, plan, dump_dir)
    timings["graph_stage_s"] = time.perf_counter() - start
    cache = cache_layout_from_graph(graph) if loaded.kind == "decoder" else []
    report: dict[str, Any] = {"stage": "compressed", **plan_report(plan), "options": options_summary(options),
                              "graph_stage": context.report(), **rotation_report}
    target_report = apply_target(graph, target, target_bits, _plain_causal(loaded))
    report["kv_bytes_per_token_fp16_graph"] = sum(layer.bytes_per_token() // 2 for layer in cache)
    with atomic_output_dir(out, overwrite) as tmp:
        save_plan(plan, tmp)
        config = write_bundle(loaded, graph, cache, tmp, report)
        if eval_text is None:
            release_torch_model(loaded, graph)
        target_report = finish_target(tmp, config, target_report, target_strict, loaded.tokenizer, npu_options, verify,
                                      timings)
        if target_report is not None:
            report = {**json.loads((tmp / "report.json").read_text()), "target": target_report,
                      "weight_bytes": graph_weight_bytes(tmp, config)}
            write_json(tmp / "report.json", report)
        if eval_text is not None and not config.static_shapes:
            start = time.perf_counter()
            report["perplexity"] = _evaluate_bundle(loaded, plan, tmp, eval_text, eval_windows)
            timings["eval_s"] = time.perf_counter() - start
            report = {**json.loads((tmp / "report.json").read_text()), "perplexity": report["perplexity"]}
            write_json(tmp / "report.json", report)
        _finish_bundle(tmp, config, mobile, timings)
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)


def _build_compressed_vlm_bundle(loaded: LoadedModel, options: Any, out: Path, overwrite: bool,
                                 timings: dict[str, float], start: float, dense_graph: Path | None, target: str | None,
                                 bits: str | None, strict: bool, mobile: bool, eval_text: str | None) -> BuildResult:
    """``compress`` of a vision-language model: one plan over both towers (images + text calibration), then
    the three-graph bundle (qsvd_export/vlm_bundle.py)."""
    from qsvd_export.compress.compressor import compress_model, options_summary
    from qsvd_export.vlm_bundle import build_vlm_bundle, check_vlm_options

    check_vlm_options(target, mobile, options.residual_rotation)
    for flag, given in (("--dense-graph", dense_graph is not None), ("--eval", eval_text is not None)):
        if given:
            raise UsageError(f"{flag} is not supported for vision-language models yet")
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    folder = loaded.weights_dir
    plan = compress_model(loaded, options, reload=None if folder is None else lambda: load_model(str(folder)).model)
    timings["compress_s"] = time.perf_counter() - start
    report = {"stage": "compressed", **plan_report(plan), "options": options_summary(options)}
    return build_vlm_bundle(loaded, out, overwrite, timings, plan, report, target, bits, strict)


def _absorbed_kv(loaded: LoadedModel, options: Any, target: str | None, dense_graph: Path | None) -> bool:
    """Whether ``compress`` meets its budget with absorbed latent attention: the cpu target, a plain causal
    decoder, a KV-only budget, no residual rotation and no given dense graph."""
    return (target == "cpu" and _plain_causal(loaded) and options.budget.params is None
            and options.budget.kv is not None and not options.residual_rotation and dense_graph is None)


def _evaluate_onnx(loaded: LoadedModel, bundle: Path, text: str, windows: int) -> dict[str, Any]:
    """Perplexity of the dense torch model and of the bundle (ONNX) on ``windows`` × 512 tokens of ``text``."""
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.evaluate import torch_window_nlls
    from qsvd_export.progress import bar
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

    rows = token_windows(loaded.tokenizer, read_text(text), 512, windows, source=text)
    progress = bar(2 * len(rows), "perplexity (dense in torch, bundle in ONNX)")
    dense = perplexity(torch_window_nlls(loaded.model, rows, progress.update))
    onnx = perplexity(DecoderRunner(bundle).window_nlls(rows, progress=progress.update))
    progress.close()
    return {"text": text, "windows": len(rows), "length": 512, "dense": round(dense, 4),
            "compressed_onnx": round(onnx, 4)}


def _evaluate_bundle(loaded: LoadedModel, plan: Any, bundle: Path, text: str, windows: int) -> dict[str, Any]:
    """Perplexity of the dense model and the plan-applied model (torch) and of the compiled bundle (ONNX); for a
    model with a chat template also ``chat``: the bundle's chat quality against dense torch (chat_quality.py)."""
    import copy

    from qsvd_export.data import read_text, token_windows
    from qsvd_export.evaluate import torch_window_nlls
    from qsvd_export.plan import apply_plan
    from qsvd_export.progress import bar
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

    rows = token_windows(loaded.tokenizer, read_text(text), 512, windows, source=text)
    progress = bar(3 * len(rows), "perplexity (dense, plan in torch, bundle in ONNX)")
    dense = perplexity(torch_window_nlls(loaded.model, rows, progress.update))
    compressed = perplexity(torch_window_nlls(apply_plan(copy.deepcopy(loaded.model), plan), rows, progress.update))
    onnx = perplexity(DecoderRunner(bundle).window_nlls(rows, progress=progress.update))
    progress.close()
    result = {"text": text, "windows": len(rows), "length": 512, "dense": round(dense, 4),
              "compressed_torch": round(compressed, 4), "compressed_onnx": round(onnx, 4)}
    if getattr(loaded.tokenizer, "chat_template", None):  # instruct models: chat quality of the bundle vs dense torch
        from qsvd_export.chat_quality import TorchScorer, bundle_chat_quality

        result["chat"] = bundle_chat_quality(TorchScorer(loaded.model), {"bundle": bundle}, tokenizer=loaded.tokenizer)
    return result


def _export_preset(loaded: LoadedModel, target: str) -> tuple[str | None, bool]:
    """(bits, smooth) when the user chose neither: smoothing needs the torch model, a supported family
    and calibration text, which only ``export`` has."""
    from qsvd_export.compress.smooth import SUPPORTED
    from qsvd_export.targets import policy_for

    preset = policy_for(target).smoothed_default
    if preset and loaded.tokenizer is not None and getattr(loaded.model.config, "model_type", "") in SUPPORTED:
        return preset, True
    return None, False


def _smooth(loaded: LoadedModel, target: str, bits: str | None, windows: int, seed: int) -> dict[str, Any]:
    """Smooth ``loaded`` for ``target``'s weight bits (options already checked by _check_target_options)."""
    import torch

    from qsvd_export.compress.smooth import smooth_for_weight_bits
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.targets import policy_for

    policy = policy_for(target)
    chosen = policy.bits(bits)
    assert chosen.weights is not None
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name}: no tokenizer, so no text calibration for --smooth")
    rows = token_windows(loaded.tokenizer, read_text("wiki_calib"), 512, windows, source="wiki_calib")
    batches = [torch.from_numpy(row[None, :]) for row in rows]
    return smooth_for_weight_bits(loaded.model, batches, chosen.weights, policy.block_size, seed)


def _check_rotation_options(rotate: bool, online: bool, target: str | None, bits: str | None) -> None:
    """--rotate-mlp / --rotate-o-proj (``online``) need --rotate; npu presets whose measured best is the other
    rotation setting get a note (smollm2, 32 × 128 wiki_eval)."""
    if online and not rotate:
        raise UsageError("--rotate-mlp and --rotate-o-proj need --rotate (online rotations are part of the rotated model)")
    if target != "npu" or bits is None:
        return
    from qsvd_export.progress import info

    if bits == "w8a8" and not rotate:
        info("note: npu w8a8 keeps the norm outputs' outlier channels in one 8-bit range without --rotate "
             "(smollm2: 1.059x dense without, 1.015x with --rotate)")
    if bits.startswith("w4") and rotate:
        info("note: npu int4 blocks lose precision on rotated weights "
             "(smollm2 w4a16: 1.561x dense with --rotate, 1.154x without)")


def _check_target_options(target: str | None, bits: str | None, smooth: bool | None = None) -> None:
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


def _plain_causal(loaded: LoadedModel) -> bool:
    from qsvd_export.targets import plain_causal

    config = loaded.model.config
    return loaded.kind == "decoder" and plain_causal(str(getattr(config, "model_type", "")), config)


def apply_target(model: ir.Model, target: str | None, bits: str | None,
                 plain_causal: bool = False, latent: dict[int, Any] | None = None) -> dict[str, Any] | None:
    """The target stage after the graph stage: quantize for ``target``'s policy (None: leave fp32).
    ``plain_causal``: :func:`qsvd_export.targets.plain_causal` of the source model; ``latent``: the KV cache
    layouts of its fused attention (:func:`latent_kv_layers`)."""
    if target is None:
        return None
    from onnx_ir.passes import common

    from qsvd_export.passes.chain import check_model
    from qsvd_export.targets import policy_for

    policy = policy_for(target)
    chosen = policy.bits(bits)
    if target == "npu":
        return {"target": target, "bits": chosen.name}  # static graphs + QDQ are built on files: finish_target
    report = {"target": target, "bits": chosen.name, **policy.quantize(model, chosen, plain_causal, latent)}
    common.RemoveUnusedNodesPass()(model)
    check_model(model)
    return report


def finish_target(folder: Path, config: BundleConfig, target_report: dict[str, Any] | None, strict: bool,
                  tokenizer: Any, npu_options: Any = None, verify: bool = True,
                  timings: dict[str, float] | None = None) -> dict[str, Any] | None:
    """File-level target steps once ``folder`` holds ``model.onnx``: the cpu/gpu check of ONNX Runtime's
    optimized graph, or for npu the static prefill/decode QDQ graphs replacing ``model.onnx`` (config
    rewritten) and their QNN HTP verification. Returns the completed target report (wall times go to
    ``timings``, never into the deterministic report)."""
    if target_report is None:
        return None
    if target_report["target"] != "npu":
        check_target(folder / GRAPH_FILE, target_report, strict)
        return target_report
    from qsvd_export.npu import finish_npu_bundle

    return finish_npu_bundle(folder, config, target_report, strict, tokenizer, npu_options, verify,
                             timings if timings is not None else {})


def _finish_bundle(folder: Path, config: BundleConfig, mobile: bool, timings: dict[str, float]) -> dict[str, Any] | None:
    """Last steps inside the temporary bundle folder once config and report are final: ``--mobile``
    packaging (.ort graphs, reduced-build operator config, their verification; ``mobile.py`` updates
    qsvd_config.json and report.json), the bundle README, timings.json. Returns the mobile report."""
    from qsvd_export.bundle_readme import write_readme

    from qsvd_export.report import write_report

    mobile_report = None
    if mobile:
        from qsvd_export.mobile import package_mobile
        from qsvd_export.progress import info

        info("mobile: ORT-format graphs, required_operators.config and a parity check on the CPU EP")
        mobile_report = package_mobile(folder, config, timings)
    from qsvd_export.runtime_files import readme_section, write_runtime_files

    report = json.loads((folder / "report.json").read_text())
    report["runtimes"] = write_runtime_files(folder, config, (report.get("target") or {}).get("target"))
    write_json(folder / "report.json", report)
    start = time.perf_counter()
    write_report(folder, config)
    timings["report_s"] = time.perf_counter() - start
    write_readme(folder)
    with (folder / "README.md").open("a") as readme:  # genai / optimum: how to open the bundle, or why not
        readme.write(readme_section(report["runtimes"]))
    write_json(folder / "timings.json", {k: round(v, 3) for k, v in timings.items()})
    return mobile_report


def _graph_only_plan(graph_path: Path, source: BundleConfig | None, options: Any, calib_npz: Path | None,
                     tokenizer_dir: Path | None = None, calib_images: Path | None = None,
                     folder: Any = None, model_config: dict[str, Any] | None = None,
                     analysis_path: Path | None = None) -> Any:
    """A plan from the graph: a vision graph calibrated on the images of ``calib_images``; a language
    graph on ``calib_npz``'s token windows, else on text tokenized by the tokenizer of ``folder`` (the
    ``--tokenizer`` folder or the exporter folder beside the graph, :mod:`qsvd_export.foreign`) or of the
    bundle beside the graph. Head counts: ``model_config`` (bundle, else the folder's config), checked
    against the graph's head-split Reshapes, or the graph's own when no config gives them. ``analysis_path``:
    the graph file the plan is computed on when it differs from ``graph_path`` (an unfused copy)."""
    from qsvd_export.compress.compressor import calibration_windows, with_calibration_defaults
    from qsvd_export.compress.graph_only import graph_only_plan, npz_windows, text_source
    from qsvd_export.data import resolve_text
    from qsvd_export.foreign import load_tokenizer, model_folder, vocab_ok

    if folder is None and tokenizer_dir is not None:
        folder = model_folder(Path(tokenizer_dir))
    if model_config is None:
        model_config = source.model_config if source else (folder.config if folder else {})
    kind = source.kind if source else _graph_kind(graph_path)
    name = source.model_name if source else graph_path.stem
    model_type = source.model_type if source else str(model_config.get("model_type", "unknown"))
    options = with_calibration_defaults(options, kind)
    if kind == "vision" and calib_images is None and calib_npz is None:
        raise UsageError(f"{graph_path.name} is a vision graph: it calibrates on images, give --calib-images DIR "
                         "(or --calib-npz with pixel_values)")
    if kind != "vision" and calib_images is not None:
        raise UsageError(f"{graph_path.name} is a {kind} graph: --calib-images is for vision graphs")
    if calib_images is not None:
        from qsvd_export.compress.images import image_samples, normalization

        height, width = _image_size(graph_path, model_config)
        mean, std, origin = normalization([graph_path.parent] + ([Path(tokenizer_dir)] if tokenizer_dir else []))
        windows, calib_source = image_samples(Path(calib_images), height, width, options.calib_windows, mean, std)
        calib_source["normalization"] = origin
    elif calib_npz is not None:
        image = (3, *_image_size(graph_path, model_config)) if kind == "vision" else None
        windows, calib_source = npz_windows(Path(calib_npz), model_config.get("vocab_size"), image)
    else:
        if folder is not None and folder.tokenizer:
            tokenizer = load_tokenizer(folder)
        elif source is not None and (source.tokenizer_files or source.model_name.startswith("tiny-")):
            tokenizer = bundle_tokenizer(graph_path.parent)
        else:
            where = f"in {folder.path}" if folder is not None else f"beside {graph_path.name}"
            raise UsageError(f"{graph_path.name} is a {kind} graph: --budget calibrates it on text, and there are no "
                             f"tokenizer files {where}: give --tokenizer DIR (the model's tokenizer) or --calib-npz "
                             "FILE (token windows)")
        windows = calibration_windows(tokenizer, kind, options)
        vocab_ok(windows, model_config.get("vocab_size"))
        calib_source = text_source(resolve_text(options.calib_text))
    origin = "the bundle's qsvd_config.json" if source else (folder.describe() if folder and folder.config_file
                                                             else "the model config")
    return graph_only_plan(analysis_path or graph_path, model_config, name, model_type, kind, windows, options,
                           calib_source, config_origin=origin)


def _hf_text_config(folder: Path) -> dict[str, Any]:
    """The language model's settings from an HF ``config.json`` (a VLM's ``text_config``), or from
    onnxruntime-genai's ``genai_config.json``; ``{}`` when the folder has neither."""
    from qsvd_export.foreign import model_folder

    return model_folder(Path(folder)).config


def _save_folder_tokenizer(folder: Path, out: Path) -> list[str]:
    """The tokenizer of an HF model folder saved into ``out``: the files written (none if it has none)."""
    from qsvd_export.foreign import load_tokenizer, model_folder

    found = model_folder(Path(folder))
    if not found.tokenizer:
        return []
    return save_tokenizer(load_tokenizer(found), out)


def _graph_kind(graph_path: Path) -> str:
    """decoder (a ``logits`` output), vision (one 4-D float input) or encoder, from the graph's I/O."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    if "logits" in [o.name for o in graph.output]:
        return "decoder"
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) == 1 and inputs[0].type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) \
            and len(inputs[0].type.tensor_type.shape.dim) == 4:
        return "vision"
    return "encoder"


def _image_size(graph_path: Path, model_config: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of a vision graph's input: its static dims, else ``image_size`` of the model config."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph.input[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[2] and dims[3]:
        return int(dims[2]), int(dims[3])
    size = model_config.get("image_size")
    if size is None:
        raise UsageError(f"{graph_path.name}: dynamic image size and no image_size in the model config")
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def graph_weight_bytes(folder: Path, config: BundleConfig) -> int:
    """Bytes of the external data files the bundle's graphs use (a shared file counted once)."""
    import onnx

    files: set[str] = set()
    for spec in config.graphs:
        proto = onnx.load(folder / spec.filename, load_external_data=False)
        files.update(entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                     if entry.key == "location")
    return sum((folder / name).stat().st_size for name in files)


def check_target(graph_path: Path, report: dict[str, Any], strict: bool) -> None:
    """Inspect the graph ONNX Runtime will run; with ``strict``, any float constant-weight MatMul is an error."""
    from qsvd_export.errors import RuntimeFailure
    from qsvd_export.targets import optimized_op_counts

    if report["bits"] == "fp":
        return
    counts = optimized_op_counts(graph_path)
    report["onnxruntime_optimized_graph"] = counts
    if strict and counts["float_matmuls_with_constant_weight"]:
        raise RuntimeFailure(f"--strict: {counts['float_matmuls_with_constant_weight']} MatMuls with constant "
                             f"weights stay float for target {report['target']}, e.g. {', '.join(counts['examples'])}")


def _foreign_config(graph_path: Path, model: ir.Model, source: BundleConfig | None, folder: Any,
                    needs_heads: bool) -> dict[str, Any]:
    """The ``model_config`` of a graph without its bundle: the folder's settings, checked against the
    graph's head-split Reshapes (a contradiction is a UsageError naming the file), completed with what the
    graph shows (heads, hidden size, layers, vocabulary). A bundle's own config is returned as it is."""
    from qsvd_export.foreign import geometry_config, resolve_geometry
    from qsvd_export.passes.find_attention import find_attention

    if source is not None:
        return source.model_config
    config = dict(folder.config) if folder is not None else {}
    blocks = find_attention(model).blocks
    if not blocks:
        return config
    origin = folder.describe() if folder is not None and folder.config_file else "the model config"
    try:
        geometry = resolve_geometry(config, blocks, origin)
    except UsageError:
        if needs_heads or config.get("num_attention_heads") is not None:
            raise  # a contradiction always; an unknown head count only where the plan needs it
        return config
    return {**geometry_config(blocks, geometry, model), **config}


def compile_onnx(graph_path: Path, plan_path: Path | None, out: Path, overwrite: bool = False,
                 dump_dir: Path | None = None, target: str | None = None, bits: str | None = None,
                 strict: bool = False, npu_options: Any = None, verify: bool = True,
                 mobile: bool = False, graph_only: Any = None, calib_npz: Path | None = None,
                 tokenizer_dir: Path | None = None, calib_images: Path | None = None) -> BuildResult:
    """``qsvd-export model.onnx [--plan PLAN | --budget B] [--target T --bits B]``: graph stage (+ target stage).

    The graph's settings and tokenizer come from its bundle (qsvd_config.json beside it), else from
    ``tokenizer_dir`` (an HF model folder), else from the folder an exporter wrote (optimum: config.json and
    tokenizer files; onnxruntime-genai: genai_config.json), checked against the graph (``foreign.py``);
    head counts the config does not give come from the graph's reshapes.
    ``graph_only`` (CompressOptions): build the plan from the graph itself (``compress.graph_only``),
    calibrated in ONNX Runtime on text tokenized by that tokenizer, on the token windows of ``calib_npz``,
    or (vision graphs) on ``calib_images``."""
    import shutil

    from qsvd_export.bundle import check_output_dir, load_bundle_config
    from qsvd_export.export import cache_layout_from_graph
    from qsvd_export.foreign import exporter_folder, model_folder
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes.chain import run_graph_stage
    from qsvd_export.plan import load_plan, save_plan

    check_output_dir(out, overwrite)
    _check_target_options(target, bits)
    graph_path = Path(graph_path)
    source_dir = graph_path.resolve().parent
    source = load_bundle_config(source_dir) if (source_dir / CONFIG_NAME).is_file() else None
    if tokenizer_dir is not None:
        folder = model_folder(Path(tokenizer_dir))
        if not folder.config_file and not folder.tokenizer:
            raise UsageError(f"--tokenizer {tokenizer_dir}: no tokenizer files and no config.json there")
    else:
        folder = exporter_folder(graph_path) if source is None else None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = load_onnx(graph_path)
    from qsvd_export.passes.unfuse_attention import unfuse_attention

    unfused, fused_left = unfuse_attention(model)  # ONNX Attention (opset 23) → MatMul, Softmax, MatMul
    from qsvd_export.passes.canonical_attention import canonicalize_attention

    canonical = canonicalize_attention(model)  # sdpa's computed repeat_kv shapes, K-side scale → latent-pass forms
    kind = source.kind if source else _graph_kind(graph_path)
    if target == "npu":
        if kind != "decoder":
            raise UsageError(f"{graph_path.name} is a {kind} graph: target npu builds static decoder graphs")
        bundle_text = source is not None and (source.tokenizer_files or source.model_name.startswith("tiny-"))
        if not bundle_text and not (folder is not None and folder.tokenizer):
            where = f"in {folder.path}" if folder is not None else f"beside {graph_path.name}"
            raise UsageError(f"target npu calibrates activation ranges on text: it needs the graph's bundle or the "
                             f"model's tokenizer files {where} (tokenizer.json, tokenizer_config.json): give "
                             "--tokenizer DIR")
    model_config = _foreign_config(graph_path, model, source, folder, needs_heads=graph_only is not None)
    plan = load_plan(plan_path) if plan_path is not None else None
    if graph_only is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as work:  # the plan reads the unfused graph from a file
            analysis = graph_path
            if unfused:
                analysis = Path(work) / graph_path.name
                save_graph(model, Path(work), graph_path.name)
            plan = _graph_only_plan(graph_path, source, graph_only, calib_npz, tokenizer_dir, calib_images,
                                    folder=folder, model_config=model_config, analysis_path=analysis)
        timings["graph_only_plan_s"] = time.perf_counter() - start
        start = time.perf_counter()
    context = run_graph_stage(model, plan, dump_dir)
    timings["graph_stage_s"] = time.perf_counter() - start
    start = time.perf_counter()
    from qsvd_export.targets import plain_causal

    model_type = source.model_type if source is not None else str(model_config.get("model_type") or "")
    target_report = apply_target(model, target, bits, plain_causal(model_type))
    timings["target_stage_s"] = time.perf_counter() - start
    cache = cache_layout_from_graph(model)
    inputs, outputs = graph_io(model)
    config = BundleConfig(
        model_name=source.model_name if source else graph_path.stem,
        model_type=source.model_type if source else (model_type or "unknown"),
        kind=kind,
        graphs=[GraphSpec("model", GRAPH_FILE, inputs, outputs)],
        cache=cache,
        model_config=model_config,
        generation=source.generation if source else {},
        tokenizer_files=source.tokenizer_files if source else [],
        source={"graph": str(graph_path.name), **(source.source if source else {})},
    )
    if source is None and folder is not None:
        config.source["model_folder"] = "--tokenizer" if tokenizer_dir is not None else "beside the graph"
    report: dict[str, Any] = {"stage": "graph", "graph_stage": context.report()}
    if unfused or fused_left:
        report["unfused_attention"] = {"rewritten": unfused, "left": fused_left}
    if canonical:
        report["canonical_attention_rewrites"] = canonical
    if plan is not None:
        report.update(plan_report(plan))
    with atomic_output_dir(out, overwrite) as tmp:
        save_graph(model, tmp)
        for name in [*config.tokenizer_files, "config.json", "generation_config.json"]:
            if name in config.tokenizer_files or (source_dir / name).is_file():
                shutil.copy2(source_dir / name, tmp / name)
        if source is None and folder is not None and folder.tokenizer:  # the model folder's tokenizer travels
            config.tokenizer_files = _save_folder_tokenizer(folder.path, tmp)
            if kind == "decoder" and config.tokenizer_files:
                from types import SimpleNamespace

                tokenizer = bundle_tokenizer_from(tmp)
                config.generation = generation_summary(SimpleNamespace(**model_config), tokenizer,
                                                       bool(getattr(tokenizer, "chat_template", None)))
        if plan is not None:
            save_plan(plan, tmp)
        (tmp / CONFIG_NAME).write_text(config.to_json())
        if target_report is not None:
            tokenizer = bundle_tokenizer(tmp) if target_report["target"] == "npu" else None
            report["target"] = finish_target(tmp, config, target_report, strict, tokenizer, npu_options, verify,
                                             timings)
        report["kv_bytes_per_token"] = config.kv_bytes_per_token()
        report["weight_bytes"] = graph_weight_bytes(tmp, config)
        write_json(tmp / "report.json", report)
        _finish_bundle(tmp, config, mobile, timings)
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)


def bundle_tokenizer_from(folder: Path) -> Any:
    """The tokenizer saved in ``folder`` (before its qsvd_config.json exists)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
