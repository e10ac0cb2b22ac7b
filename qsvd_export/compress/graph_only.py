"""Graph-only plans: a :class:`CompressionPlan` from an ONNX graph alone (no torch model).

Weights come from the initializers of the projections ``find_attention`` matched (any layout it
matches: MatMul, transposed, Gemm, fused QKV); activation statistics from running the graph in ONNX
Runtime on calibration windows with each block's projection input added as an output. There are no
gradients, so whitening is input-side only and ranks are allocated by whitened spectrum energy
(``analyze_statistics`` without a gradient runner); everything after (allocation, β, H2) is the torch
stage's code. Head geometry (heads, kv heads, head dim) comes from the bundle config beside the graph.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from qsvd_export.compress.budget import LayerDims
from qsvd_export.compress.calibrate import InputStats
from qsvd_export.compress.compressor import CompressOptions, analyze_statistics, build_plan, with_calibration_defaults
from qsvd_export.errors import UsageError
from qsvd_export.passes.find_attention import AttentionBlock, find_attention
from qsvd_export.plan import CompressionPlan
from qsvd_export.progress import bar
from qsvd_export.runtimes.feeds import first_step_feed


def graph_input_stats(graph_path: Path, blocks: list[AttentionBlock], windows: np.ndarray, sample_rows: int = 2048,
                      seed: int = 0) -> list[InputStats]:
    """Σxᵀx, Σ|x| and sampled rows of every block's projection input over ``windows`` [n, L] (CPU EP)."""
    import onnxruntime as ort

    names = [block.x.name for block in blocks]
    model = ir.load(graph_path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    for name in names:
        if name not in {o.name for o in model.graph.outputs}:
            model.graph.outputs.append(values[name])
    dim = int(blocks[0].dims["e"])
    stats = [InputStats(torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)) for _ in blocks]
    rng = np.random.default_rng(seed)
    per_window = max(1, sample_rows // max(len(windows), 1))
    with tempfile.TemporaryDirectory() as tmp:
        ir.save(model, Path(tmp) / "probe.onnx", external_data="probe.onnx.data")
        del model
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(Path(tmp) / "probe.onnx"), sess_options=so, providers=["CPUExecutionProvider"])
        caches = {c.past.name for block in blocks for c in (block.k_cache, block.v_cache) if c is not None}
        progress = bar(len(windows), "graph calibration statistics")
        for row in windows:
            try:
                feed = first_step_feed(session.get_inputs(), row[None, :].astype(np.int64), caches)
            except ValueError as exc:
                raise UsageError(f"graph-only calibration: {exc}") from None
            outputs = session.run(names, feed)
            for stat, x in zip(stats, outputs):
                x64 = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1, dim))
                stat.xtx += x64.T @ x64
                stat.abs_sum += x64.abs().sum(0)
                stat.count += x64.shape[0]
                take = np.sort(rng.choice(x64.shape[0], size=min(per_window, x64.shape[0]), replace=False))
                stat.sample.append(x64[torch.from_numpy(take)].float())
            progress.update()
        progress.close()
    return stats


def _geometry(model_config: dict[str, Any], blocks: list[AttentionBlock]) -> list[dict[str, int]]:
    try:
        heads, kv_heads = int(model_config["num_attention_heads"]), int(model_config.get("num_key_value_heads")
                                                                          or model_config["num_attention_heads"])
    except (KeyError, TypeError):
        raise UsageError("graph-only compression needs the head counts: run it on a bundle's model.onnx "
                         "(qsvd_config.json → model_config) or pass --plan") from None
    meta = []
    for block in blocks:
        head_dim = int(model_config.get("head_dim") or block.dims["q"] // heads)
        if block.dims["q"] != heads * head_dim or block.dims["k"] != kv_heads * head_dim:
            raise UsageError(f"attention block {block.index}: projection widths {block.dims} do not match "
                             f"{heads} heads / {kv_heads} kv heads of {head_dim}")
        meta.append({"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim})
    return meta


def graph_only_plan(graph_path: Path, model_config: dict[str, Any], model_name: str, model_type: str, kind: str,
                    windows: np.ndarray, options: CompressOptions, calib_source: dict[str, Any]) -> CompressionPlan:
    """Plan for the graph at ``graph_path`` under ``options.budget`` from activation statistics over
    ``windows`` [n, L] (gradient-free: energy importance, input-side whitening)."""
    options = with_calibration_defaults(options, kind)
    matches = find_attention(ir.load(graph_path))
    if not matches.blocks:
        raise UsageError(f"{graph_path.name}: no attention block found, nothing to compress"
                         + (f" ({matches.failures[0].reason})" if matches.failures else ""))
    blocks = matches.blocks
    meta = _geometry(model_config, blocks)
    dims = [LayerDims(**b.dims) for b in blocks]
    weights = [tuple(torch.from_numpy(np.ascontiguousarray(p.weight.T, dtype=np.float32)) for p in (b.q, b.k, b.v))
               for b in blocks]
    stats = graph_input_stats(graph_path, blocks, windows, seed=options.seed)
    calibration = {**calib_source, "windows": int(len(windows)), "length": int(windows.shape[1]),
                   "source": "onnxruntime (graph-only)"}
    analysis = analyze_statistics(dims, meta, weights, stats, kind, options, calibration)  # type: ignore[arg-type]
    return build_plan(model_name, model_type, analysis, options)


def text_source(text_path: Path) -> dict[str, Any]:
    return {"text": text_path.name, "sha256": hashlib.sha256(text_path.read_bytes()).hexdigest()}


def npz_windows(path: Path, vocab_size: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration token windows from ``path``: an ``.npz`` holding ``input_ids``, integer [n, L] (n ≥ 1,
    L ≥ 2, every id below ``vocab_size``). Loaded without pickle. Returns (windows int64, source record)."""
    import zipfile

    from qsvd_export.errors import BadInputError

    try:
        with np.load(path, allow_pickle=False) as archive:
            if "input_ids" not in archive.files:
                raise BadInputError(f"{path}: no 'input_ids' array (has: {', '.join(archive.files) or 'nothing'})")
            ids = archive["input_ids"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"{path}: not a readable .npz of arrays ({exc.__class__.__name__}: {exc})") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise BadInputError(f"{path}: input_ids must be integer [windows, tokens] with tokens >= 2, "
                            f"got {ids.dtype} {list(ids.shape)}")
    if ids.min() < 0 or (vocab_size and ids.max() >= vocab_size):
        raise BadInputError(f"{path}: input_ids must lie in [0, {vocab_size or 'vocab'}), got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64), {"npz": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
