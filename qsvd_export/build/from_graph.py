"""``qsvd-export model.onnx``: the graph stage (and target stage) on an existing ONNX graph, with a plan from
``--plan``, built from the graph itself (``--budget``), or none."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qsvd_export.build.files import (
    GRAPH_FILE,
    BuildResult,
    bundle_tokenizer_from,
    generation_summary,
    graph_io,
    graph_weight_bytes,
    plan_report,
    save_folder_tokenizer,
    save_graph,
)
from qsvd_export.build.finish import apply_target, finish_bundle, finish_target
from qsvd_export.bundle import CONFIG_NAME, BundleConfig, GraphSpec, atomic_output_dir, bundle_tokenizer
from qsvd_export.errors import UsageError

if TYPE_CHECKING:
    from qsvd_export.compress.options import CompressOptions
    from qsvd_export.build.request import TargetRequest


def plan_from_graph(graph_path: Path, source: BundleConfig | None, options: CompressOptions, calib_npz: Path | None,
                     tokenizer_dir: Path | None = None, calib_images: Path | None = None,
                     folder: Any = None, model_config: dict[str, Any] | None = None,
                     analysis_path: Path | None = None) -> Any:
    """A plan from the graph: a vision graph calibrated on the images of ``calib_images``; a language
    graph on ``calib_npz``'s token windows, else on text tokenized by the tokenizer of ``folder`` (the
    ``--tokenizer`` folder or the exporter folder beside the graph, :mod:`qsvd_export.foreign`) or of the
    bundle beside the graph. Head counts: ``model_config`` (bundle, else the folder's config), checked
    against the graph's head-split Reshapes, or the graph's own when no config gives them. ``analysis_path``:
    the graph file the plan is computed on when it differs from ``graph_path`` (an unfused copy)."""
    from qsvd_export.compress.compressor import calibration_windows
    from qsvd_export.compress.graph_only import graph_only_plan, npz_windows, text_source
    from qsvd_export.compress.options import with_calibration_defaults
    from qsvd_export.data import resolve_text
    from qsvd_export.foreign import load_tokenizer, model_folder, vocab_ok

    if folder is None and tokenizer_dir is not None:
        folder = model_folder(Path(tokenizer_dir))
    if model_config is None:
        model_config = source.model_config if source else (folder.config if folder else {})
    kind = source.kind if source else graph_kind(graph_path)
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

        height, width = image_size(graph_path, model_config)
        mean, std, origin = normalization([graph_path.parent] + ([Path(tokenizer_dir)] if tokenizer_dir else []))
        windows, calib_source = image_samples(Path(calib_images), height, width, options.calib_windows, mean, std)
        calib_source["normalization"] = origin
    elif calib_npz is not None:
        image = (3, *image_size(graph_path, model_config)) if kind == "vision" else None
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


def hf_text_config(folder: Path) -> dict[str, Any]:
    """The language model's settings from an HF ``config.json`` (a VLM's ``text_config``), or from
    onnxruntime-genai's ``genai_config.json``; ``{}`` when the folder has neither."""
    from qsvd_export.foreign import model_folder

    return model_folder(Path(folder)).config


def graph_kind(graph_path: Path) -> str:
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


def image_size(graph_path: Path, model_config: dict[str, Any]) -> tuple[int, int]:
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


def foreign_config(graph_path: Path, model: ir.Model, source: BundleConfig | None, folder: Any,
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
                 dump_dir: Path | None = None, target: TargetRequest | None = None,
                 mobile: bool = False, graph_only: CompressOptions | None = None, calib_npz: Path | None = None,
                 tokenizer_dir: Path | None = None, calib_images: Path | None = None) -> BuildResult:
    """``qsvd-export model.onnx [--plan PLAN | --budget B] [--target T --bits B]``: graph stage (+ target stage).

    The graph's settings and tokenizer come from its bundle (qsvd_config.json beside it), else from
    ``tokenizer_dir`` (an HF model folder), else from the folder an exporter wrote (optimum: config.json and
    tokenizer files; onnxruntime-genai: genai_config.json), checked against the graph (``foreign.py``);
    head counts the config does not give come from the graph's reshapes.
    ``graph_only`` (CompressOptions): build the plan from the graph itself (``compress.graph_only``),
    calibrated in ONNX Runtime on text tokenized by that tokenizer, on the token windows of ``calib_npz``,
    or (vision graphs) on ``calib_images``. ``target.latent_cache_bits`` (``--target cpu``): the latent cache crosses
    the graph boundary as int8 codes (:mod:`qsvd_export.targets.latent_cache`; "auto": where the graph has one)."""
    import shutil

    from qsvd_export.bundle import check_output_dir, load_bundle_config
    from qsvd_export.export import cache_layout_from_graph
    from qsvd_export.foreign import exporter_folder, model_folder
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes.chain import run_graph_stage
    from qsvd_export.plan.io import load_plan, save_plan

    check_output_dir(out, overwrite)
    target_name = target.target if target is not None else None
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
    kind = source.kind if source else graph_kind(graph_path)
    if target_name == "npu":
        if kind != "decoder":
            raise UsageError(f"{graph_path.name} is a {kind} graph: target npu builds static decoder graphs")
        if not any((v.name or "").startswith("past_key_values.") for v in model.graph.inputs):
            raise UsageError(f"{graph_path.name} is a decoder graph without KV cache inputs (past_key_values.*): "
                             "target npu builds static prefill/decode graphs over a cache; export it with its cache "
                             "(e.g. optimum's text-generation-with-past)")
        bundle_text = source is not None and (source.tokenizer_files or source.model_name.startswith("tiny-"))
        if not bundle_text and not (folder is not None and folder.tokenizer):
            where = f"in {folder.path}" if folder is not None else f"beside {graph_path.name}"
            raise UsageError(f"target npu calibrates activation ranges on text: it needs the graph's bundle or the "
                             f"model's tokenizer files {where} (tokenizer.json, tokenizer_config.json): give "
                             "--tokenizer DIR")
    model_config = foreign_config(graph_path, model, source, folder, needs_heads=graph_only is not None)
    plan = load_plan(plan_path) if plan_path is not None else None
    if graph_only is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as work:  # the plan reads the unfused graph from a file
            analysis = graph_path
            if unfused:
                analysis = Path(work) / graph_path.name
                save_graph(model, Path(work), graph_path.name)
            plan = plan_from_graph(graph_path, source, graph_only, calib_npz, tokenizer_dir, calib_images,
                                    folder=folder, model_config=model_config, analysis_path=analysis)
        timings["graph_only_plan_s"] = time.perf_counter() - start
        start = time.perf_counter()
    context = run_graph_stage(model, plan, dump_dir)
    timings["graph_stage_s"] = time.perf_counter() - start
    start = time.perf_counter()
    from qsvd_export.targets import plain_causal, policy_for

    model_type = source.model_type if source is not None else str(model_config.get("model_type") or "")
    target_report = apply_target(model, target, plain_causal(model_type))
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
            config.tokenizer_files = save_folder_tokenizer(folder.path, tmp)
            if kind == "decoder" and config.tokenizer_files:
                from types import SimpleNamespace

                tokenizer = bundle_tokenizer_from(tmp)
                config.generation = generation_summary(SimpleNamespace(**model_config), tokenizer,
                                                       bool(getattr(tokenizer, "chat_template", None)))
        if plan is not None:
            save_plan(plan, tmp)
        (tmp / CONFIG_NAME).write_text(config.to_json())
        if target_report is not None:
            from qsvd_export.targets.latent_cache import latent_cache_bits_for

            quantizes_latent = latent_cache_bits_for(target, config) is not None
            tokenizer = None
            if policy_for(target_report["target"]).static_graphs or quantizes_latent:
                try:
                    tokenizer = bundle_tokenizer(tmp)
                except UsageError:
                    if not quantizes_latent:
                        raise
                    raise UsageError("--target cpu calibrates the 8-bit latent cache on text and this graph has no "
                                     "tokenizer: give --tokenizer HF_DIR, or --kv-bits 32 for a float latent "
                                     "cache") from None
            report["target"] = finish_target(tmp, config, target_report, target, tokenizer, timings)
        report["kv_bytes_per_token"] = config.kv_bytes_per_token()
        report["weight_bytes"] = graph_weight_bytes(tmp, config)
        finish_bundle(tmp, config, report, mobile, timings)
    report = json.loads((Path(out) / "report.json").read_text())
    return BuildResult(Path(out), config, report, timings)

