"""Graph-only plans: a :class:`CompressionPlan` from an ONNX graph alone (no torch model).

Weights come from the initializers of the projections ``find_attention`` matched (any layout it
matches: MatMul, transposed, Gemm, fused QKV); activation statistics from running the graph in ONNX
Runtime on calibration windows with each block's projection input added as an output. Gradients come
from the graph itself, differentiated in torch (:mod:`~qsvd_export.compress.graph_autograd`): the loss
of its own output (next-token cross-entropy of the logits; an encoder's hidden-state probe) gives the
output-gradient Fisher whitening and the first-order importance of the torch stage. With
``grad_windows=0``, or a graph holding ops outside the differentiable set (a warning names them), the
plan is gradient-free: input-side whitening and whitened spectrum energy. Everything after (allocation,
β, H2) is the torch stage's code. Head geometry (heads, kv heads, head dim) comes from the model config
(bundle, exporter folder or ``--tokenizer``) checked against the graph's head-split Reshapes, else from
those Reshapes alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsvd_export.compress.budget import LayerDims
from qsvd_export.compress.calibrate import InputStats
from qsvd_export.compress.compressor import GradientRunner, OutputFisherSum, analyze_statistics, build_plan
from qsvd_export.compress.options import CompressOptions, with_calibration_defaults
from qsvd_export.compress.graph_autograd import TorchGraph, UnsupportedGraph
from qsvd_export.compress.graph_probe import probe_values
from qsvd_export.errors import UsageError
from qsvd_export.onnx_io import load_onnx
from qsvd_export.passes.find_attention import AttentionBlock, find_attention
from qsvd_export.plan.schema import CompressionPlan
from qsvd_export.progress import bar, warn
from qsvd_export.runtimes.feeds import sample_feed


def graph_input_stats(graph_path: Path, blocks: list[AttentionBlock], windows: np.ndarray, sample_rows: int = 2048,
                      seed: int = 0) -> list[InputStats]:
    """Σxᵀx, Σ|x| and sampled rows of every block's projection input over ``windows`` (CPU EP): token
    windows [n, L] int, or images [n, C, H, W] float for a vision graph."""
    names = [block.x.name for block in blocks]
    dim = int(blocks[0].dims["e"])
    stats = [InputStats(torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)) for _ in blocks]
    rng = np.random.default_rng(seed)
    per_window = max(1, sample_rows // max(len(windows), 1))
    for outputs in probe_values(graph_path, names, blocks, windows, "graph-only calibration"):  # type: ignore[arg-type]
        for stat, x in zip(stats, outputs):
            x64 = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1, dim))
            stat.xtx += x64.T @ x64
            stat.abs_sum += x64.abs().sum(0)
            stat.count += x64.shape[0]
            take = np.sort(rng.choice(x64.shape[0], size=min(per_window, x64.shape[0]), replace=False))
            stat.sample.append(x64[torch.from_numpy(take)].float())
    return stats


def graph_loss(kind: str, outputs: dict[str, torch.Tensor], row: np.ndarray, index: int) -> torch.Tensor:
    """The torch stage's calibration loss on the graph's outputs: next-token cross-entropy of ``logits``
    [1, L, V] for decoders, else ⟨v, h⟩/√T for the first output h [1, T, H] and v ~ N(0, I) seeded by
    ``index`` (:func:`~qsvd_export.compress.calibrate.hidden_state_probe_loss`)."""
    if kind == "decoder":
        if "logits" not in outputs:
            raise UnsupportedGraph("decoder graph without a 'logits' output")
        logits = outputs["logits"][0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(row[1:], dtype=np.int64)))
    hidden = next(iter(outputs.values())).float()
    generator = torch.Generator().manual_seed(int(index))
    probe = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype)
    return (hidden * probe).sum() / hidden.shape[1] ** 0.5


def for_each_graph_gradient(graph: TorchGraph, blocks: list[AttentionBlock], kind: str, windows: np.ndarray,
                            callback: Any, capture_outputs: bool = False, progress: Any = None) -> None:
    """Per sample of ``windows`` (token window [L] or image [C, H, W]): the loss's gradient w.r.t. every block's q/k/v projection outputs G_m
    [tokens, out_m], then ``callback(i, weight_grads, output_grads)`` as in
    :func:`~qsvd_export.compress.calibrate.for_each_gradient`: weight grads (G_mᵀ·X per member, [out_m, E])
    and, if ``capture_outputs``, dL/d[q|k|v] as [tokens, q+k+v]."""
    caches = {c.past.name for block in blocks for c in (block.k_cache, block.v_cache) if c is not None}
    members = [(block.q.output.name, block.k.output.name, block.v.output.name) for block in blocks]
    leaves = [name for names in members for name in names]
    described = graph.input_descriptions()
    for i, row in enumerate(windows):
        try:
            feed = sample_feed(described, np.asarray(row), caches)
        except ValueError as exc:
            raise UsageError(f"graph-only gradients: {exc}") from None
        with torch.enable_grad():
            outputs, seen = graph.run(feed, watch=[b.x.name for b in blocks], leaves=leaves)
            loss = graph_loss(kind, outputs, row, i)
            grads = torch.autograd.grad(loss, [seen[name] for name in leaves], allow_unused=True)
        by_name = {name: (torch.zeros_like(seen[name]) if g is None else g) for name, g in zip(leaves, grads)}
        del outputs, loss, grads
        weight_grads, output_grads = [], []
        for block, names in zip(blocks, members):
            x = seen[block.x.name].detach()
            x = x.reshape(-1, x.shape[-1])
            parts = [by_name[n].reshape(x.shape[0], -1) for n in names]
            weight_grads.append(tuple(g.T @ x for g in parts))
            if capture_outputs:
                output_grads.append(torch.cat(parts, dim=-1))
        del seen, by_name
        callback(i, weight_grads, output_grads if capture_outputs else None)
        if progress is not None:
            progress()


def graph_output_fisher(graph: TorchGraph, blocks: list[AttentionBlock], kind: str, windows: np.ndarray) -> list[torch.Tensor]:
    """Per block, the empirical Fisher of the [q | k | v] outputs over ``windows`` (float64, mean of Σ_t g gᵀ)."""
    fisher = OutputFisherSum()
    progress = bar(len(windows), "output Fisher (graph)")
    for_each_graph_gradient(graph, blocks, kind, windows, fisher, capture_outputs=True, progress=progress.update)
    progress.close()
    return fisher.mean(len(windows))


def _differentiable(graph_path: Path) -> tuple[TorchGraph | None, str]:
    """(the graph as a :class:`TorchGraph`, "torch autograd of the graph") or (None, why not, warned)."""
    try:
        return TorchGraph.load(graph_path), "torch autograd of the graph"
    except UnsupportedGraph as exc:
        return None, _gradient_free(exc)


def _gradient_free(reason: Exception) -> str:
    """Warn that the plan goes without gradients; the record for ``plan.calibration["gradients"]``."""
    warn(f"graph-only gradients unavailable ({reason}); ranks by whitened spectrum energy, input-side whitening only")
    return f"none: {reason}"


def _geometry(model_config: dict[str, Any], blocks: list[AttentionBlock],
              origin: str = "the model config") -> list[dict[str, int]]:
    """Per block: heads, kv heads, head dim: ``model_config``'s (named ``origin`` in errors) checked against
    the graph's head-split Reshapes, else the graph's own (:func:`qsvd_export.foreign.resolve_geometry`)."""
    from qsvd_export.foreign import resolve_geometry

    return [{"num_heads": g.heads, "num_kv_heads": g.kv_heads, "head_dim": g.head_dim}
            for g in resolve_geometry(model_config, blocks, origin)]


def graph_only_plan(graph_path: Path, model_config: dict[str, Any], model_name: str, model_type: str, kind: str,
                    windows: np.ndarray, options: CompressOptions, calib_source: dict[str, Any],
                    config_origin: str = "the model config") -> CompressionPlan:
    """Plan for the graph at ``graph_path`` under ``options.budget`` from activation statistics over
    ``windows`` (token windows [n, L], or images [n, C, H, W]) and, unless ``options.grad_windows`` is 0 or the graph cannot be differentiated,
    the graph's own gradients on the first ``grad_windows`` of them (else gradient-free: energy
    importance, input-side whitening)."""
    options = with_calibration_defaults(options, kind)
    matches = find_attention(load_onnx(graph_path))
    if not matches.blocks:
        raise UsageError(f"{graph_path.name}: no attention block found, nothing to compress"
                         + (f" ({matches.failures[0].reason})" if matches.failures else ""))
    blocks = matches.blocks
    meta = _geometry(model_config, blocks, config_origin)
    dims = [LayerDims(**b.dims) for b in blocks]
    weights = [tuple(torch.from_numpy(np.ascontiguousarray(p.weight.T, dtype=np.float32)) for p in (b.q, b.k, b.v))
               for b in blocks]
    stats = graph_input_stats(graph_path, blocks, windows, seed=options.seed)
    calibration = {**calib_source, "windows": int(len(windows)), "source": "onnxruntime (graph-only)"}
    if windows.ndim == 2:  # token windows; images record their size in calib_source
        calibration["length"] = int(windows.shape[1])
    graph, gradient_source = _differentiable(graph_path) if options.grad_windows else (None, "none (--grad-windows 0)")
    calibration["gradients"] = gradient_source
    output_fisher: list[torch.Tensor] | None = None
    gradients: GradientRunner | None = None
    if graph is not None and options.whitening == "fisher":
        try:
            output_fisher = graph_output_fisher(graph, blocks, kind, windows[: options.grad_windows])
        except UnsupportedGraph as exc:  # an op the load-time check passed failed on real shapes
            graph, calibration["gradients"] = None, _gradient_free(exc)
    if graph is not None:

        def run_gradients(accumulate: Any, grad_rows: np.ndarray, progress: Any) -> None:
            for_each_graph_gradient(graph, blocks, kind, grad_rows, accumulate, progress=progress)

        gradients = run_gradients
    analysis = analyze_statistics(dims, meta, weights, stats, kind, options, calibration,  # type: ignore[arg-type]
                                  output_fisher=output_fisher, gradients=gradients, windows=windows)
    return build_plan(model_name, model_type, analysis, options)


def text_source(text_path: Path) -> dict[str, Any]:
    return {"text": text_path.name, "sha256": hashlib.sha256(text_path.read_bytes()).hexdigest()}


def npz_windows(path: Path, vocab_size: int | None,
                image_shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration samples from ``path``, an ``.npz`` loaded without pickle: ``input_ids``, integer [n, L]
    (n ≥ 1, L ≥ 2, every id below ``vocab_size``), or for a vision graph (``image_shape`` (C, H, W) given)
    ``pixel_values``, finite float [n, C, H, W], already normalised as the model expects.
    Returns (samples: int64 windows or float32 images, source record)."""
    import zipfile

    from qsvd_export.errors import BadInputError

    key = "input_ids" if image_shape is None else "pixel_values"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise BadInputError(f"{path}: no '{key}' array (has: {', '.join(archive.files) or 'nothing'})")
            data = archive[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"{path}: not a readable .npz of arrays ({exc.__class__.__name__}: {exc})") from None
    source = {"npz": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if image_shape is not None:
        if data.ndim != 4 or not np.issubdtype(data.dtype, np.floating) or tuple(data.shape[1:]) != tuple(image_shape) \
                or len(data) < 1:
            raise BadInputError(f"{path}: pixel_values must be float [images, {', '.join(map(str, image_shape))}], "
                                f"got {data.dtype} {list(data.shape)}")
        if not np.isfinite(data).all():
            raise BadInputError(f"{path}: pixel_values hold NaN or Inf")
        return data.astype(np.float32), source
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer) or data.shape[0] < 1 or data.shape[1] < 2:
        raise BadInputError(f"{path}: input_ids must be integer [windows, tokens] with tokens >= 2, "
                            f"got {data.dtype} {list(data.shape)}")
    if data.min() < 0 or (vocab_size and data.max() >= vocab_size):
        raise BadInputError(f"{path}: input_ids must lie in [0, {vocab_size or 'vocab'}), got [{data.min()}, {data.max()}]")
    return data.astype(np.int64), source
