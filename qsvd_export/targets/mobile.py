"""``--mobile``: every graph of a bundle also in ONNX Runtime's ORT format, plus the operator config
for a reduced onnxruntime build, verified against the ONNX graphs.

Runs inside the bundle's temporary folder after the target stage (``build/finish.py``), so a failure leaves
no output. Per graph in ``qsvd_config.json``: ``<name>.ort`` beside ``<name>.onnx`` (``GraphSpec.ort_filename``),
written by onnxruntime itself (``session.save_model_format=ORT``, as ``onnxruntime.tools.convert_onnx_models_to_ort``
does) on the CPU EP at the *basic* optimization level: constant folding and redundant-node removal only,
no EP- or CPU-specific fusions, so the file stays portable across execution providers. Static npu (QDQ)
graphs are saved unoptimized: even basic folding rewrites QDQ weight initializers, and the QNN EP should
see the QDQ graph that was calibrated and verified. The ORT format embeds the weights (no external data;
flatbuffers cap a file at 2 GiB). ``required_operators.config`` (one for all graphs, with per-operator
types) is ``onnxruntime.tools``' ``create_config_from_models`` output, usable as
``build.py --include_ops_by_config`` (types apply with ``--enable_reduced_operator_type_support``).

Determinism: onnxruntime serializes the kernel-type-string table of an ORT file from a hash map seeded
per process (absl), so the same graph gives different bytes in every run; :func:`canonical_ort_bytes`
rewrites that table in sorted order (the model part is byte-identical already).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import CONFIG_NAME, BundleConfig
from qsvd_export.errors import QsvdError, RuntimeFailure, UsageError

ORT_SUFFIX = ".ort"
OPERATORS_CONFIG = "required_operators.config"
MAX_ORT_BYTES = 2**31 - 1  # flatbuffers' limit on one buffer, i.e. on one .ort file
TOLERANCE = 1e-5  # max |Δ| between the .ort and the .onnx graph on the same feed
PROMPT = "The capital of France is"


def package_mobile(folder: Path, config: BundleConfig, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Write ``<graph>.ort`` for every graph of the bundle in ``folder`` and ``required_operators.config``,
    verify each .ort against its .onnx and record ``ort_filename`` in ``qsvd_config.json``. Returns the
    ``mobile`` section of ``report.json``."""
    start = time.perf_counter()
    level = "none" if config.static_shapes else "basic"
    for spec in config.graphs:
        check_fits(folder / spec.filename)
    files: dict[str, Any] = {}
    for spec in config.graphs:
        target = folder / (Path(spec.filename).stem + ORT_SUFFIX)
        convert_to_ort(folder / spec.filename, target, level)
        spec.ort_filename = target.name
        files[spec.role] = {"file": target.name, "bytes": target.stat().st_size, "nodes": len(ort_nodes(target))}
    operators = write_operators_config([folder / spec.ort_filename for spec in config.graphs if spec.ort_filename],
                                       folder / OPERATORS_CONFIG)
    verification = verify_ort(folder, config, level)
    (folder / CONFIG_NAME).write_text(config.to_json())
    report = {"format": "ort", "optimization": level, "graphs": files,
              "operators_config": {"file": OPERATORS_CONFIG, "operators": operators},
              "verification": verification}
    if timings is not None:
        timings["mobile_s"] = time.perf_counter() - start
    return report


def check_fits(graph: Path) -> None:
    """Refuse a graph whose weights (external data included) cannot fit in one ORT-format file."""
    import onnx

    proto = onnx.load(graph, load_external_data=False)
    total, whole_files = proto.ByteSize(), set()
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        if "length" in entries:
            total += int(entries["length"])
        elif "location" in entries:
            whole_files.add(entries["location"])  # no length: count the whole file once (an upper bound)
    total += sum((graph.parent / name).stat().st_size for name in whole_files)
    if total > MAX_ORT_BYTES:
        raise UsageError(f"--mobile: {graph.name} holds {total / 2**30:.2f} GiB; the ORT format embeds the weights "
                         f"in one flatbuffer of at most 2 GiB (quantize with --target cpu, or drop --mobile)")


def convert_to_ort(source: Path, target: Path, level: str = "basic") -> None:
    """``source`` (.onnx, external data allowed) → ``target`` (.ort) by onnxruntime on the CPU EP, then
    :func:`canonical_ort_bytes` for byte-identical output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(source), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain Exception subclasses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise RuntimeFailure(f"--mobile: onnxruntime could not save {source.name} in ORT format: {first}") from None
    target.write_bytes(canonical_ort_bytes(target.read_bytes()))


def _fbs() -> Any:
    import onnxruntime.tools.ort_format_model  # noqa: F401 - puts ort_flatbuffers_py on sys.path
    import ort_flatbuffers_py.fbs as fbs

    return fbs


def canonical_ort_bytes(data: bytes) -> bytes:
    """The same ORT file with its kernel-type-string resolver in sorted order.

    onnxruntime writes ``ort_version``, then the model, then the resolver, then the root table, and
    flatbuffers build back to front, so the model subtree is one self-contained tail of the buffer.
    That tail is copied verbatim (same distance from the end, so every alignment holds) and the resolver
    and root table are rebuilt in front of it with entries sorted by op id and type string.
    """
    import flatbuffers

    fbs = _fbs()
    buf = bytearray(data)
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise RuntimeFailure("--mobile: onnxruntime wrote a file that is not in ORT format")
    root = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0)
    tab = root._tab

    def field(slot: int) -> int:
        offset = tab.Offset(4 + 2 * slot)
        if not offset:
            raise RuntimeFailure(f"--mobile: ORT file without field {slot} of its root table")
        return tab.Indirect(tab.Pos + offset)

    version_pos, model_pos = field(0), field(1)
    vtable_pos = model_pos - int.from_bytes(buf[model_pos:model_pos + 4], "little", signed=True)
    tail_start = min(model_pos, vtable_pos)
    if version_pos < tail_start:
        raise RuntimeFailure("--mobile: unexpected ORT file layout (version string before the model)")
    resolver = root.KernelTypeStrResolver()
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength() if resolver is not None else 0):
        op = resolver.OpKernelTypeStrArgs(i)
        kernel = []
        for j in range(op.KernelTypeStrArgsLength()):
            item = op.KernelTypeStrArgs(j)
            args = [(item.Args(k).ArgType(), item.Args(k).Index()) for k in range(item.ArgsLength())]
            kernel.append((item.KernelTypeStr().decode(), args))
        entries.append((op.OpId().decode(), sorted(kernel)))
    entries.sort()

    size = len(buf)
    tail = bytes(buf[tail_start:])
    builder = flatbuffers.Builder(len(tail) + 64 * 1024 + 64 * len(entries))
    builder.head -= len(tail)
    builder.Bytes[builder.head:builder.head + len(tail)] = tail
    builder.minalign = 16
    version, model = size - version_pos, size - model_pos  # builder offsets count from the end
    A, K, O, R, S = (fbs.ArgTypeAndIndex, fbs.KernelTypeStrArgsEntry, fbs.OpIdKernelTypeStrArgsEntry,
                     fbs.KernelTypeStrResolver, fbs.InferenceSession)
    op_offsets = []
    for op_id, kernel in entries:
        kernel_offsets = []
        for type_str, args in kernel:
            name = builder.CreateString(type_str)
            arg_offsets = []
            for arg_type, index in args:
                A.ArgTypeAndIndexStart(builder)
                A.ArgTypeAndIndexAddArgType(builder, arg_type)
                A.ArgTypeAndIndexAddIndex(builder, index)
                arg_offsets.append(A.ArgTypeAndIndexEnd(builder))
            args_vector = _vector(builder, K.KernelTypeStrArgsEntryStartArgsVector, arg_offsets)
            K.KernelTypeStrArgsEntryStart(builder)
            K.KernelTypeStrArgsEntryAddKernelTypeStr(builder, name)
            K.KernelTypeStrArgsEntryAddArgs(builder, args_vector)
            kernel_offsets.append(K.KernelTypeStrArgsEntryEnd(builder))
        name = builder.CreateString(op_id)
        kernel_vector = _vector(builder, O.OpIdKernelTypeStrArgsEntryStartKernelTypeStrArgsVector, kernel_offsets)
        O.OpIdKernelTypeStrArgsEntryStart(builder)
        O.OpIdKernelTypeStrArgsEntryAddOpId(builder, name)
        O.OpIdKernelTypeStrArgsEntryAddKernelTypeStrArgs(builder, kernel_vector)
        op_offsets.append(O.OpIdKernelTypeStrArgsEntryEnd(builder))
    op_vector = _vector(builder, R.KernelTypeStrResolverStartOpKernelTypeStrArgsVector, op_offsets)
    R.KernelTypeStrResolverStart(builder)
    R.KernelTypeStrResolverAddOpKernelTypeStrArgs(builder, op_vector)
    resolver_offset = R.KernelTypeStrResolverEnd(builder)
    S.InferenceSessionStart(builder)
    S.InferenceSessionAddOrtVersion(builder, version)
    S.InferenceSessionAddModel(builder, model)
    S.InferenceSessionAddKernelTypeStrResolver(builder, resolver_offset)
    builder.Finish(S.InferenceSessionEnd(builder), file_identifier=b"ORTM")
    return bytes(builder.Output())


def _vector(builder: Any, start: Any, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def ort_nodes(path: Path) -> list[tuple[str, int, str]]:
    """(domain, opset it has since, op_type) of every node in an ORT file's main graph."""
    fbs = _fbs()
    buf = bytearray(path.read_bytes())
    graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph()
    nodes = [graph.Nodes(i) for i in range(graph.NodesLength())]
    return [((n.Domain() or b"").decode() or "ai.onnx", n.SinceVersion(), n.OpType().decode()) for n in nodes]


def write_operators_config(ort_files: list[Path], target: Path) -> int:
    """onnxruntime's reduced-build operator config (with types) for ``ort_files``; the header names the files
    relative to the bundle (onnxruntime writes absolute paths). Returns the number of operator kernels
    (domain, opset, op) it lists."""
    import logging

    from onnxruntime.tools.ort_format_model import create_config_from_models

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs every file at INFO
    create_config_from_models(ort_files, target, enable_type_reduction=True)
    body = [line for line in target.read_text().splitlines() if line and not line.startswith("#")]
    header = ["# onnxruntime reduced build: build.py --include_ops_by_config required_operators.config",
              "# (per-operator types apply with --enable_reduced_operator_type_support)",
              "# Generated from model/s:", *(f"# - {path.name}" for path in sorted(ort_files))]
    target.write_text("\n".join(header + body) + "\n")
    return len({node for path in ort_files for node in ort_nodes(path)})


_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}


def _session(path: Path, level: str = "all") -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1  # one thread: reproducible sums, so report.json stays deterministic
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _prompt_ids(folder: Path, config: BundleConfig, length: int) -> list[int]:
    """``length`` token ids of a fixed English prompt (repeated), or fixed ids where there is no tokenizer."""
    from qsvd_export.bundle import bundle_tokenizer

    vocab = int(config.model_config.get("vocab_size") or 256)
    try:
        ids = [int(i) for i in bundle_tokenizer(folder)(PROMPT, add_special_tokens=False)["input_ids"]]
    except (QsvdError, OSError, ValueError):
        ids = []
    ids = ids or [(7 * i + 3) % vocab for i in range(length)]
    return [i % vocab for i in (ids * (length // len(ids) + 1))[:length]]


def _dynamic_feeds(folder: Path, config: BundleConfig, session: Any) -> list[dict[str, np.ndarray]]:
    """Feeds for a dynamic graph: a decoder's prompt with an empty cache (a second step is added by the
    caller), an encoder's token block, or a vision model's seeded image batch of one."""
    from qsvd_export.runtimes.feeds import first_step_feed

    ids = np.asarray([_prompt_ids(folder, config, 8)], dtype=np.int64)
    cache = {t.input for layer in config.cache for t in layer.tensors}
    try:
        feed = first_step_feed(session.get_inputs(), ids, cache, np.random.default_rng(0))
    except ValueError as exc:
        raise RuntimeFailure(f"--mobile: {exc} to verify with") from None
    return [feed]


def _next_step(config: BundleConfig, feed: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A decoder's second step: the greedy token with the first step's cache (exercises a non-empty past)."""
    length = feed["attention_mask"].shape[1]
    step = {"input_ids": np.asarray([[int(outputs["logits"][0, -1].argmax())]], dtype=np.int64),
            "attention_mask": np.ones((1, length + 1), dtype=np.int64)}
    if "position_ids" in feed:
        step["position_ids"] = np.asarray([[length]], dtype=np.int64)
    for layer in config.cache:
        for tensor in layer.tensors:
            step[tensor.input] = outputs[tensor.output]
    return step


def _static_feed(folder: Path, config: BundleConfig, tokens: int) -> dict[str, np.ndarray]:
    """The feed ``StaticDecoder`` builds for ``tokens`` new tokens after an empty (zero) cache."""
    from qsvd_export.runtimes.static_decode import StaticDecoder

    context, prefill = int(config.static_shapes["context_length"]), int(config.static_shapes["prefill_length"])
    decoder = StaticDecoder(None, None, config.cache, context, prefill)
    ids = _prompt_ids(folder, config, tokens)
    return decoder.feed(decoder.empty_state(), ids, [True] * tokens)[1]


def verify_ort(folder: Path, config: BundleConfig, level: str = "basic") -> dict[str, Any]:
    """Each graph's .ort vs its .onnx on the CPU EP (one thread) on a real input. The gate: max |Δ| over
    every output ≤ :data:`TOLERANCE` against the .onnx optimized at the .ort's own ``level`` (onnxruntime
    optimizes an ORT-format graph no further when it loads it, so this is the same computation). Also
    reported: max |Δ| against the .onnx with all optimizations, as ``run --target cpu`` uses it (float
    graphs: the same up to float rounding; QDQ graphs: the CPU EP's fused integer kernels differ)."""
    graphs: dict[str, Any] = {}
    for spec in config.graphs:
        assert spec.ort_filename is not None
        reference, candidate = _session(folder / spec.filename, level), _session(folder / spec.ort_filename)
        optimized = _session(folder / spec.filename, "all")
        if config.static_shapes:
            tokens = int(config.static_shapes["prefill_length"]) if spec.role == "prefill" else 1
            feeds = [_static_feed(folder, config, tokens)]
        else:
            feeds = _dynamic_feeds(folder, config, reference)
        names = [o.name for o in reference.get_outputs()]
        worst, versus_all, scale, steps = 0.0, 0.0, 0.0, 0
        while feeds:
            feed = feeds.pop(0)
            expected = dict(zip(names, reference.run(names, feed)))
            actual = dict(zip(names, candidate.run(names, feed)))
            full = dict(zip(names, optimized.run(names, feed)))
            for name in names:
                a, b = np.asarray(expected[name], dtype=np.float64), np.asarray(actual[name], dtype=np.float64)
                if a.shape != b.shape:
                    raise RuntimeFailure(f"--mobile: {spec.ort_filename} output {name} has shape {b.shape}, "
                                         f"the ONNX graph {a.shape}")
                if a.size:
                    worst, scale = max(worst, float(np.abs(a - b).max())), max(scale, float(np.abs(a).max()))
                    versus_all = max(versus_all, float(np.abs(np.asarray(full[name], dtype=np.float64) - b).max()))
            steps += 1
            if steps == 1 and config.kind == "decoder" and not config.static_shapes:
                feeds.append(_next_step(config, feed, expected))
        graphs[spec.role] = {"steps": steps, "max_abs_diff": worst, "max_abs_diff_vs_all_optimizations": versus_all,
                             "max_abs_output": round(scale, 4)}
        if not worst <= TOLERANCE:
            raise RuntimeFailure(f"--mobile: {spec.ort_filename} differs from {spec.filename} by max |Δ| {worst:.3g} "
                                 f"(> {TOLERANCE:g}) on the CPU EP")
    return {"provider": "CPUExecutionProvider", "reference_optimization": level, "tolerance": TOLERANCE,
            "graphs": graphs,
            "max_abs_diff": max(g["max_abs_diff"] for g in graphs.values())}
