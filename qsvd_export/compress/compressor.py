"""The torch stage end to end: calibration → whitened SVDs → importance → allocation → β, H2 → plan.

Importance of component i of a candidate group (paper, §3): mean over calibration windows n of
(σ_i · [Uᵀ G_n S⁻ᵀ V]_ii)², G_n the gradient of the window's LM loss w.r.t. the dense joint weight.
Encoders have no LM loss; they use a random hidden-state probe whose gradients estimate the Gauss-Newton
matrix of the output embeddings (:func:`~qsvd_export.compress.calibrate.hidden_state_probe_loss`).
With ``grad_windows=0`` the whitened spectrum energy σ_i² / Σ_j σ_j² of each layer is used instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from qsvd_export.compress.allocate import (
    LayerScores, allocate_fisher, allocate_qsvd, allocate_uniform,
)
from qsvd_export.compress.beta import rotated_factors, search_beta
from qsvd_export.compress.budget import LayerDims, ratios
from qsvd_export.compress.options import CompressOptions, with_calibration_defaults
from qsvd_export.compress.calibrate import LossFn, collect_input_stats, for_each_gradient, hidden_state_probe_loss, lm_loss
from qsvd_export.compress.memory import return_freed_memory
from qsvd_export.compress.placement import torch_stage_placement
from qsvd_export.compress.rotation import latent_rotation
from qsvd_export.compress.vlm_calibration import vlm_calibration, vlm_loss
from qsvd_export.compress.svd import WhitenedSVD, output_whitening, whitened_svd, whitening
from qsvd_export.data import read_text, resolve_text, token_windows
from qsvd_export.errors import UnsupportedModelError, UsageError
from qsvd_export.models.projections import attention_projections
from qsvd_export.plan.schema import CompressionPlan, PlanGroup, PlanLayer, weight_probes
from qsvd_export.progress import bar, info
from qsvd_export.quant.presets import Bits, parse_bits
from qsvd_export.loaded import LoadedModel

ALLOCATIONS = ("qsvd", "uniform", "fisher")
# Input side of the fisher whitening, chosen by measurement (docs/decisions.md): absmean on smollm2,
# Cholesky (SVD-LLM) on minilm.
FISHER_INPUT_DEFAULT = {"decoder": "absmean", "encoder": "cholesky", "vision": "cholesky", "vlm": "absmean"}
# (windows, tokens per window, gradient windows). Decoders: EVAL.md's 128 x 512. Sentence encoders embed
# sentences, so they calibrate on sentence-length windows (measured on minilm: 256 x 32 beats 128 x 128).
# Vision graphs (graph-only, --calib-images): up to 128 images, gradients on 32; no token length.
# VLMs: 64 image + 256-token text samples (an image prompt adds image_seq_len tokens per frame), 16 with gradients.
def _candidate_groups(options: CompressOptions) -> tuple[str, ...]:
    if options.grouping == "separate":
        return ("k", "v")
    if options.allocation == "qsvd" and options.grouping == "auto":
        # Q alone is only factored to save parameters: without a params budget its SVD would go unused
        return ("qkv", "kv", "q") if options.budget.params is not None else ("qkv", "kv")
    return (options.grouping,)


def _member_weight(block_weights: tuple[torch.Tensor, ...], members: str) -> torch.Tensor:
    return torch.cat([block_weights["qkv".index(m)] for m in members], dim=0)


def _member_index(dims: LayerDims, members: str) -> torch.Tensor:
    """Positions of ``members``' output channels inside the concatenated [q | k | v] outputs."""
    start = {"q": 0, "k": dims.q, "v": dims.q + dims.k}
    return torch.cat([torch.arange(start[m], start[m] + dims.out(m)) for m in members])


class OutputFisherSum:
    """A gradient callback (``for_each_gradient`` / ``for_each_graph_gradient`` with ``capture_outputs``)
    summing Σ_t g_t g_tᵀ of every block's [q | k | v] output gradients (float64); ``mean(n)`` divides in place."""

    def __init__(self) -> None:
        self.fisher: list[torch.Tensor] = []

    def __call__(self, _: int, __: Any, outputs: list[torch.Tensor] | None) -> None:
        assert outputs is not None
        for bi, g in enumerate(outputs):
            g64 = g.double()
            if len(self.fisher) <= bi:
                self.fisher.append(torch.zeros(g64.shape[1], g64.shape[1], dtype=torch.float64, device=g64.device))
            self.fisher[bi] += g64.T @ g64

    def mean(self, count: int) -> list[torch.Tensor]:
        for f in self.fisher:
            f /= count  # in place: a second copy would double the largest statistic
        return self.fisher


def _output_fisher(model: torch.nn.Module, blocks: list[Any], windows: np.ndarray, loss_fn: LossFn) -> list[torch.Tensor]:
    """Per block, the empirical Fisher of the [q | k | v] outputs: mean over windows of Σ_t g_t g_tᵀ (float64)."""
    fisher = OutputFisherSum()
    progress = bar(len(windows), "output Fisher")
    for_each_gradient(model, blocks, windows, fisher, capture_outputs=True, progress=progress.update, loss_fn=loss_fn)
    progress.close()
    return fisher.mean(len(windows))


def kfac_importance(dims: list[LayerDims], stats: list[Any], svds: list[dict[str, WhitenedSVD]],
                    output_fisher: list[torch.Tensor], groups: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """Second-order (K-FAC) loss increase of dropping component i: ½ σ_i² (r_iᵀ C r_i)(u_iᵀ F u_i).

    C = E[xᵀx] of the block input, F = output-gradient Fisher of the group's outputs. Also returns a
    per-layer Fisher proxy tr(F)·tr(C) for the Palu-style baseline.
    """
    importance: list[dict[str, torch.Tensor]] = []
    fisher: list[dict[str, float]] = []
    for li, svd in enumerate(svds):
        cov = stats[li].covariance()
        importance.append({})
        fisher.append({})
        for g in groups:
            index = _member_index(dims[li], g)
            out_f = output_fisher[li][index][:, index]
            comp = svd[g]
            r, u = comp.r.double(), comp.u.double()
            input_side = ((r @ cov) * r).sum(1)
            output_side = ((out_f @ u) * u).sum(0)
            importance[li][g] = 0.5 * comp.sigma**2 * input_side * output_side
            fisher[li][g] = float(torch.trace(out_f) * torch.trace(cov))
    return importance, fisher


def calibration_windows(tokenizer: Any, kind: str, options: CompressOptions) -> np.ndarray:
    """Calibration token windows [calib_windows, calib_length] int64 of ``options.calib_text``; an encoder's
    windows start with its CLS and end with its SEP token (when the tokenizer has them), as its inputs do."""
    windows = token_windows(tokenizer, read_text(options.calib_text), options.calib_length, options.calib_windows,
                            source=str(options.calib_text))
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if kind == "encoder" and cls_id is not None and sep_id is not None:
        windows = np.concatenate([np.full((len(windows), 1), cls_id), windows[:, 1:-1], np.full((len(windows), 1), sep_id)], 1)
    return windows


def _calibration_batches(loaded: LoadedModel, options: CompressOptions) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name}: no tokenizer, so no text calibration (tiny test models: pass windows)")
    windows = calibration_windows(loaded.tokenizer, loaded.kind, options)
    batches = [{"input_ids": torch.from_numpy(w[None, :]), "attention_mask": torch.ones(1, len(w), dtype=torch.int64)} for w in windows]
    return windows, batches


@dataclass
class Analysis:
    """Everything allocation needs, computed once per (model, calibration, whitening)."""

    dims: list[LayerDims]
    blocks_meta: list[dict[str, int]]  # heads, kv_heads, head_dim per block
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    stats: list[Any]
    svds: list[dict[str, WhitenedSVD]]
    scores: list[LayerScores]
    importance_kind: str
    whitening: str
    output_fisher: list[torch.Tensor] | None
    calibration: dict[str, Any]


def _input_whitening(options: CompressOptions, kind: str) -> tuple[str, float]:
    """(input-side whitening, absmean exponent α) that ``options`` ask for on a model of ``kind``."""
    alpha = options.alpha if options.alpha is not None else (1.0 if options.whitening == "fisher" else 0.5)
    if options.whitening != "fisher":
        return options.whitening, alpha
    input_side = options.fisher_input or FISHER_INPUT_DEFAULT[kind]
    if input_side not in ("absmean", "cholesky"):
        raise UsageError(f"unknown fisher input whitening '{input_side}' (absmean or cholesky)")
    return input_side, alpha


def analyze(loaded: LoadedModel, options: CompressOptions, windows: np.ndarray | None = None,
            groups: tuple[str, ...] | None = None, keep_kfac_statistics: bool = False) -> Analysis:
    """Calibration statistics, whitened SVDs of every candidate group and their importance scores.

    ``windows`` [n, length] int64 overrides text calibration (tiny test models have no tokenizer).
    ``groups`` defaults to the candidates ``options`` needs; pass more to share one analysis between methods.
    The output Fisher ([q+k+v]² float64 per layer) is dropped layer by layer as the SVDs use it, and the
    input second moments (E² float64 per layer) are only collected for the Cholesky whitening, unless kfac
    importance or ``keep_kfac_statistics`` (to score kfac afterwards) needs them.
    """
    if loaded.kind == "vision":
        raise UnsupportedModelError(f"{loaded.name}: the torch stage calibrates on text; for a vision encoder export "
                                    "it, then `qsvd-export BUNDLE/model.onnx --budget B --calib-images DIR`")
    options = with_calibration_defaults(options, loaded.kind)
    model = loaded.model
    blocks = attention_projections(model)
    loss_fn = lm_loss if loaded.kind == "decoder" else hidden_state_probe_loss
    if loaded.kind == "vlm":
        if windows is not None:
            raise UsageError(f"{loaded.name}: a vision-language model calibrates on images and text, not given windows")
        windows, batches, calib_source = vlm_calibration(loaded.processor, options)
        loss_fn = vlm_loss(batches, calib_source["prompt_length"])
    elif windows is None:
        windows, batches = _calibration_batches(loaded, options)
        text_path = resolve_text(options.calib_text)
        calib_source = {"text": str(options.calib_text), "sha256": hashlib.sha256(text_path.read_bytes()).hexdigest()}
    else:
        batches = [{"input_ids": torch.from_numpy(w[None, :]), "attention_mask": torch.ones(1, len(w), dtype=torch.int64)} for w in windows]
        calib_source = {"text": "windows given by caller", "sha256": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()}

    kfac = keep_kfac_statistics or options.importance == "kfac"
    second_moments = kfac or _input_whitening(options, loaded.kind)[0] == "cholesky"
    progress = bar(len(batches), "calibration statistics")
    stats = collect_input_stats(model, blocks, batches, seed=options.seed, progress=progress.update,
                                second_moments=second_moments)
    progress.close()

    dims = [LayerDims(**b.dims, cached=b.graph != "vision") for b in blocks]
    weights = [b.weights() for b in blocks]
    use_gradients = options.grad_windows > 0
    output_fisher = None
    if options.whitening == "fisher" and use_gradients:
        output_fisher = _output_fisher(model, blocks, windows[: options.grad_windows], loss_fn)
    meta = [{"num_heads": b.num_heads, "num_kv_heads": b.num_kv_heads, "head_dim": b.head_dim,
             **({"graph": b.graph} if b.graph else {})} for b in blocks]
    calibration = {**calib_source, "windows": len(batches), "length": int(windows.shape[1])}
    gradients = None
    if use_gradients:
        def gradients(accumulate: Callable[[int, list[tuple[torch.Tensor, ...]], Any], None], rows: np.ndarray,
                      progress: Callable[[], None]) -> None:
            for_each_gradient(model, blocks, rows, accumulate, progress=progress, loss_fn=loss_fn)
    return analyze_statistics(dims, meta, weights, stats, loaded.kind, options, calibration, groups,
                              output_fisher, gradients, windows, keep_kfac_statistics)


GradientRunner = Callable[..., None]


def analyze_statistics(dims: list[LayerDims], blocks_meta: list[dict[str, int]],
                       weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], stats: list[Any], kind: str,
                       options: CompressOptions, calibration: dict[str, Any], groups: tuple[str, ...] | None = None,
                       output_fisher: list[torch.Tensor] | None = None, gradients: GradientRunner | None = None,
                       windows: np.ndarray | None = None, keep_output_fisher: bool = False) -> Analysis:
    """Whitened SVDs of every candidate group and their importance, from per-block input statistics and
    Q/K/V weights ([out, E] each). ``gradients(accumulate, rows, progress)`` runs the model's backward
    passes (torch stage); without it (graph-only plans) importance is the whitened spectrum's energy
    share and whitening is input-side only."""
    groups = groups or _candidate_groups(options)
    input_side, alpha = _input_whitening(options, kind)
    importance_kind = options.importance if gradients is not None else "energy"
    keep_fisher = importance_kind == "kfac" or keep_output_fisher
    progress = bar(len(dims), "whitened SVDs")
    svds: list[dict[str, WhitenedSVD]] = []
    for li, (block_weights, stat) in enumerate(zip(weights, stats)):
        white = whitening(stat, input_side, alpha)
        layer_svds = {}
        for g in groups:
            out_side = None
            if output_fisher is not None:
                index = _member_index(dims[li], g)
                out_side = output_whitening(output_fisher[li][index][:, index], options.fisher_gamma)
            layer_svds[g] = whitened_svd(_member_weight(block_weights, g), white, out_side)
        svds.append(layer_svds)
        if output_fisher is not None and not keep_fisher:
            output_fisher[li] = torch.empty(0)  # the caller's list too: freed as soon as this layer is done
        progress.update()
    progress.close()
    fisher_whitened = output_fisher is not None
    if output_fisher is not None and not keep_fisher:
        output_fisher = None
    return_freed_memory()

    importance = [{g: torch.zeros(svd[g].size, dtype=torch.float64, device=svd[g].sigma.device) for g in groups}
                  for svd in svds]
    fisher = [{g: 0.0 for g in groups} for _ in svds]
    grad_windows = 0
    if importance_kind not in ("gradient", "kfac", "energy"):
        raise UsageError(f"unknown importance '{importance_kind}' (gradient or kfac)")
    if importance_kind == "kfac" and output_fisher is None:
        raise UsageError("kfac importance needs the output Fisher: use --whitening fisher")
    if importance_kind == "kfac":
        grad_windows = min(options.grad_windows, len(windows) if windows is not None else 0)
        importance, fisher = kfac_importance(dims, stats, svds, output_fisher, groups)  # type: ignore[arg-type]
    elif importance_kind == "gradient" and gradients is not None:
        grad_rows = windows[: options.grad_windows] if windows is not None else np.zeros((0, 0), np.int64)
        grad_windows = len(grad_rows)

        def accumulate(_: int, grads: list[tuple[torch.Tensor, ...]], __: Any) -> None:
            for li, g_qkv in enumerate(grads):
                for g in groups:
                    grad = _member_weight(g_qkv, g)
                    importance[li][g] += svds[li][g].first_order(grad) ** 2
                    fisher[li][g] += float((grad.double() ** 2).sum())

        progress = bar(grad_windows, "gradients")
        gradients(accumulate, grad_rows, progress.update)
        progress.close()
        for li in range(len(dims)):
            for g in groups:
                importance[li][g] /= grad_windows
                fisher[li][g] /= grad_windows
    else:
        for li, svd in enumerate(svds):
            for g in groups:
                energy = svd[g].sigma**2
                importance[li][g] = energy / energy.sum()
                fisher[li][g] = 1.0
    scores = [LayerScores(d, {g: importance[li][g].cpu().numpy() for g in groups}, fisher[li]) for li, d in enumerate(dims)]
    return Analysis(
        dims=dims,
        blocks_meta=blocks_meta,
        weights=weights,
        stats=stats,
        svds=svds,
        scores=scores,
        importance_kind=importance_kind,
        output_fisher=output_fisher,
        whitening=("fisher (input {}, output F^{:g})".format(
                       f"absmean^{alpha:g}" if input_side == "absmean" else input_side, options.fisher_gamma / 2)
                   if fisher_whitened else
                   (f"absmean^{alpha:g}" if input_side == "absmean" else input_side)),
        calibration={**calibration, "gradient_windows": grad_windows},
    )


def allocate(analysis: Analysis, options: CompressOptions) -> list[dict[str, np.ndarray]]:
    if options.allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{options.allocation}' (choose from {', '.join(ALLOCATIONS)})")
    if options.allocation == "qsvd" and options.grouping != "separate":
        return allocate_qsvd(analysis.scores, options.budget, options.grouping, options.min_rank, options.rank_multiple)
    if options.allocation == "fisher":
        return allocate_fisher(analysis.scores, options.budget, options.grouping, options.min_rank)
    return allocate_uniform(analysis.scores, options.budget, options.grouping)


def build_plan(model_name: str, model_type: str, analysis: Analysis, options: CompressOptions) -> CompressionPlan:
    """Allocate ranks under ``options.budget`` and turn the choice into factors (β, H2 folded in)."""
    bits: Bits = parse_bits(options.bits)
    choices = allocate(analysis, options)
    layers: list[PlanLayer] = []
    tensors: dict[str, torch.Tensor] = {}
    for li, choice in enumerate(choices):
        dims = analysis.dims[li]
        layer_dims = {"e": dims.e, "q": dims.q, "k": dims.k, "v": dims.v}
        probes = {m: weight_probes(w.detach().cpu().double().numpy()) for m, w in zip("qkv", analysis.weights[li])}
        layer = PlanLayer(li, layer_dims, **analysis.blocks_meta[li], probes=probes)
        for members in sorted(choice, key=lambda m: "qkv".index(m[0])):
            keep = torch.from_numpy(np.asarray(choice[members], dtype=np.int64))
            rank = len(keep)
            rot_kind, rot = latent_rotation(options.rotation, rank, seed=options.seed * 100_003 + li * 7 + len(members))
            svd = analysis.svds[li][members]
            rot = None if rot is None else rot.to(svd.sigma.device)
            if options.beta is not None:
                beta = float(options.beta)
            elif bits.weights is not None:
                x = analysis.stats[li].sample_rows()
                beta, _ = search_beta(svd, keep, _member_weight(analysis.weights[li], members), x, bits, rot)
            else:
                beta = 0.5
            down, up = rotated_factors(svd, keep, beta, rot)
            down, up = down.float().cpu(), up.float().cpu()
            tensors[CompressionPlan.tensor_name(li, members, "down")] = down
            offset = 0
            for m in members:
                width = layer_dims[m]
                tensors[CompressionPlan.tensor_name(li, members, f"up_{m}")] = up[offset:offset + width]
                offset += width
            layer.groups.append(PlanGroup(members, rank, beta, rot_kind))
        layers.append(layer)

    r1, r2 = ratios(analysis.dims, [{g.members: g.rank for g in layer.groups} for layer in layers])
    spectra = {}
    for li in sorted({0, len(choices) // 2, len(choices) - 1}):
        for members in sorted(choices[li], key=lambda m: "qkv".index(m[0])):
            sigma = analysis.svds[li][members].sigma
            spectra[f"{li}.{members}"] = {"sigma": [float(f"{v:.4g}") for v in (sigma / sigma[0]).tolist()],
                                          "kept": sorted(int(i) for i in choices[li][members])}
    plan = CompressionPlan(
        model=model_name,
        model_type=model_type,
        layers=layers,
        budget={"kv": options.budget.kv, "params": options.budget.params},
        r1=round(r1, 6),
        r2=round(r2, 6),
        method={
            "allocation": options.allocation,
            "importance": analysis.importance_kind if options.allocation != "uniform" else "none (top singular values)",
            "grouping": options.grouping,
            "whitening": analysis.whitening,
            "bits": bits.name,
            "beta": "fixed" if options.beta is not None else ("searched" if bits.weights else "0.5 (fp: no effect)"),
            "rotation": options.rotation,
            "min_rank": options.min_rank,
            **({"rank_multiple": options.rank_multiple} if options.rank_multiple != 1 else {}),
        },
        calibration=analysis.calibration,
        seed=options.seed,
        spectra=spectra,
        tensors=tensors,
    )
    info(f"plan: R1 {plan.r1:.3f}, R2 {plan.r2:.3f}, groupings " + ", ".join(sorted({la.grouping for la in layers})))
    return plan


def compress_model(loaded: LoadedModel, options: CompressOptions, windows: np.ndarray | None = None,
                   reload: Callable[[], Any] | None = None) -> CompressionPlan:
    """Build a :class:`CompressionPlan` for ``loaded`` (its weights are not modified). With ``options.device``
    other than the CPU, or ``options.device_map``, the model runs there for the torch stage and is then back
    on the CPU for export (:func:`~qsvd_export.compress.placement.torch_stage_placement`; ``reload()``
    gives a fresh CPU copy). The plan's tensors are always on the CPU."""
    with torch_stage_placement(loaded, options.device, options.device_map, reload):
        analysis = analyze(loaded, options, windows)
        plan = build_plan(loaded.name, str(loaded.model.config.model_type), analysis, options)
    del analysis  # the candidate factors of every layer: the export that follows needs the memory
    return_freed_memory()
    return plan
