"""``qsvd-export compress``: torch stage → dense export → graph stage → bundle."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsvd_export.build.dense import build_dense_bundle
from qsvd_export.build.evaluate import evaluate_bundle
from qsvd_export.build.files import BuildResult, graph_weight_bytes, plan_report, write_bundle
from qsvd_export.build.finish import apply_target, finish_bundle, finish_target
from qsvd_export.build.kv_cache import absorbed_kv
from qsvd_export.build.stages import (
    check_rotation_options,
    plain_causal_model,
    release_torch_model,
    release_torch_weights,
)
from qsvd_export.bundle import atomic_output_dir
from qsvd_export.errors import UsageError
from qsvd_export.export import export_graph
from qsvd_export.loaded import LoadedModel
from qsvd_export.zoo import load_model

if TYPE_CHECKING:
    from qsvd_export.compress.options import CompressOptions
    from qsvd_export.build.request import TargetRequest


def build_compressed_bundle(spec: str, options: CompressOptions, out: Path, overwrite: bool = False,
                            eval_text: str | None = None, eval_windows: int = 32,
                            dump_dir: Path | None = None, dense_graph: Path | None = None,
                            target: TargetRequest | None = None, mobile: bool = False) -> BuildResult:
    """``qsvd-export compress``: torch stage → dense export → graph stage → bundle (graph + plan + report).

    ``dense_graph``: an existing dense export of the same model (e.g. a dense bundle's model.onnx) to
    start the graph stage from instead of exporting again. ``target.kv``: the KV budget as the cpu target meets it
    for plain causal decoders with a KV-only budget: absorbed latent attention planned on the dense graph
    (:func:`latent_kv_layers`), no torch stage. ``target.latent_cache_bits`` (``--target cpu``, rebuild form): the
    latent cache crosses the graph boundary as int8 codes (:mod:`qsvd_export.targets.latent_cache`).
    """
    from qsvd_export.bundle import check_output_dir
    from qsvd_export.compress.compressor import compress_model
    from qsvd_export.compress.options import options_summary
    from qsvd_export.export import cache_layout_from_graph
    from qsvd_export.passes.chain import run_graph_stage
    from qsvd_export.plan.io import save_plan
    from qsvd_export.progress import info

    check_output_dir(out, overwrite)
    name, bits = (target.target, target.bits) if target is not None else (None, None)
    check_rotation_options(options.residual_rotation, options.rotate_mlp or options.rotate_o_proj, name, bits)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(spec, seed=options.seed)
    if options.calib_images is not None and loaded.kind != "vlm":
        raise UsageError(f"{loaded.name} is a {loaded.kind} model: --calib-images is for vision-language models "
                         "(vision graphs: qsvd-export GRAPH.onnx --budget B --calib-images DIR)")
    if loaded.kind == "vlm":
        return build_compressed_vlm_bundle(loaded, options, out, overwrite, timings, start, dense_graph, target,
                                            mobile, eval_text)
    if target is not None and target.kv is not None and absorbed_kv(loaded, options, name, dense_graph):
        del loaded
        return build_dense_bundle(spec, out, overwrite, options.seed, target=target, mobile=mobile,
                                  eval_text=eval_text, eval_windows=eval_windows)
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
    target_report = apply_target(graph, target, plain_causal_model(loaded))
    report["kv_bytes_per_token_fp16_graph"] = sum(layer.bytes_per_token() // 2 for layer in cache)
    with atomic_output_dir(out, overwrite) as tmp:
        save_plan(plan, tmp)
        config, report = write_bundle(loaded, graph, cache, tmp, report)
        if eval_text is None:
            release_torch_model(loaded, graph)
        target_report = finish_target(tmp, config, target_report, target, loaded.tokenizer, timings)
        if target_report is not None:
            report.update(target=target_report, weight_bytes=graph_weight_bytes(tmp, config))
        if eval_text is not None and not config.static_shapes:
            start = time.perf_counter()
            report["perplexity"] = evaluate_bundle(loaded, plan, tmp, eval_text, eval_windows)
            timings["eval_s"] = time.perf_counter() - start
        finish_bundle(tmp, config, report, mobile, timings)
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)


def build_compressed_vlm_bundle(loaded: LoadedModel, options: CompressOptions, out: Path, overwrite: bool,
                                 timings: dict[str, float], start: float, dense_graph: Path | None,
                                 target: TargetRequest | None, mobile: bool, eval_text: str | None) -> BuildResult:
    """``compress`` of a vision-language model: one plan over both towers (images + text calibration), then
    the three-graph bundle (qsvd_export/build/vlm.py)."""
    from qsvd_export.build.vlm import build_vlm_bundle, check_vlm_options
    from qsvd_export.compress.compressor import compress_model
    from qsvd_export.compress.options import options_summary

    check_vlm_options(target.target if target is not None else None, mobile, options.residual_rotation)
    for flag, given in (("--dense-graph", dense_graph is not None), ("--eval", eval_text is not None)):
        if given:
            raise UsageError(f"{flag} is not supported for vision-language models yet")
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    folder = loaded.weights_dir
    plan = compress_model(loaded, options, reload=None if folder is None else lambda: load_model(str(folder)).model)
    timings["compress_s"] = time.perf_counter() - start
    report = {"stage": "compressed", **plan_report(plan), "options": options_summary(options)}
    return build_vlm_bundle(loaded, out, overwrite, timings, plan, report, target)

