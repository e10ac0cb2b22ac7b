"""Activation-aware weight scaling for low-bit weights (AWQ-style), folded offline into the torch model.

For a linear y = x·Wᵀ whose input x has a few large channels, scaling the weight's input channels by
s (W' = W·diag(s)) and the activations by 1/s leaves y unchanged in exact arithmetic but lets the
weight quantizer spend its resolution on the channels that carry the signal. Per group of linears that
read the same input, s = mean|x|^α with α chosen on calibration rows to minimise the output error of
the *target's* weight quantizer (mirrored here: blockwise symmetric, signed block scale, see
:mod:`qsvd_export.quant.matmul_nbits`). 1/s is folded into the op that produces the input:

- q/k/v ← input_layernorm gain; gate/up ← post_attention_layernorm gain; down ← up_proj rows.

llama-style decoders only (same families as the residual rotation).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch

from qsvd_export.errors import UnsupportedModelError

SUPPORTED = ("llama", "qwen2", "mistral", "qwen3")
ALPHAS = tuple(i / 10 for i in range(11))
SAMPLE_ROWS = 2048


def fake_quant_rows(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """The cpu target's weight quantizer on an ``nn.Linear`` weight [out, in] (blocks along ``in``)."""
    out_dim, in_dim = weight.shape
    pad = (-in_dim) % block
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(out_dim, -1, block)
    half = 2 ** (bits - 1)
    extreme = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))
    scale = extreme / -half
    scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
    q = torch.clamp(torch.round(w / scale), -half, half - 1) * scale
    return q.reshape(out_dim, -1)[:, :in_dim]


class _InputRecorder:
    """Mean |x| per channel over all calls, and 256 random rows per call until SAMPLE_ROWS are kept."""

    def __init__(self, seed: int) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.rng = np.random.default_rng(seed)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.count += x.shape[0]
        if sum(len(r) for r in self.rows) < SAMPLE_ROWS:  # rows past the sample size are never read
            take = self.rng.choice(x.shape[0], size=min(x.shape[0], 256), replace=False)
            self.rows.append(x[np.sort(take)].float())

    def mean_abs(self) -> torch.Tensor:
        assert self.abs_sum is not None
        return self.abs_sum / self.count

    def sample(self) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[:SAMPLE_ROWS]


def _divide_norm_gain(norm: torch.nn.Module, s: torch.Tensor) -> None:
    norm.weight.data = (norm.weight.data.double() / s).to(norm.weight.dtype)


def _groups(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, list[torch.nn.Linear], Callable[[torch.Tensor], None]]]:
    """(name, module whose input is recorded, linears reading it, fold of 1/s into the producer)."""
    groups = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp

        def fold_up(s: torch.Tensor, up: torch.nn.Linear = mlp.up_proj) -> None:
            up.weight.data = (up.weight.data.double() / s[:, None]).to(up.weight.dtype)
            if up.bias is not None:
                up.bias.data = (up.bias.data.double() / s).to(up.bias.dtype)

        groups.append((f"layer{i}.qkv", attn.q_proj, [attn.q_proj, attn.k_proj, attn.v_proj],
                       partial(_divide_norm_gain, layer.input_layernorm)))
        groups.append((f"layer{i}.gate_up", mlp.gate_proj, [mlp.gate_proj, mlp.up_proj],
                       partial(_divide_norm_gain, layer.post_attention_layernorm)))
        groups.append((f"layer{i}.down", mlp.down_proj, [mlp.down_proj], fold_up))
    return groups


def _best_alpha(x: torch.Tensor, mean_abs: torch.Tensor, linears: list[torch.nn.Linear], bits: int,
                block: int) -> tuple[float, torch.Tensor, float, float]:
    """(α, s, error at α, error at α = 0) on rows ``x`` [n, in]."""
    reference = [x @ lin.weight.data.float().T for lin in linears]
    best = (0.0, torch.ones_like(mean_abs), float("inf"))
    base_error = float("inf")
    for alpha in ALPHAS:
        s = mean_abs.clamp_min(1e-8) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        xs = (x.double() / s).float()
        error = 0.0
        for lin, ref in zip(linears, reference):
            q = fake_quant_rows((lin.weight.data.double() * s[None, :]).float(), bits, block)
            error += float(((xs @ q.T - ref) ** 2).sum())
        if alpha == 0.0:
            base_error = error
        if error < best[2]:
            best = (alpha, s, error)
    return best[0], best[1], best[2], base_error


@torch.no_grad()
def smooth_for_weight_bits(model: torch.nn.Module, batches: list[torch.Tensor], bits: int, block: int = 32,
                           seed: int = 0) -> dict[str, object]:
    """Scale every group's weights for ``bits``-bit blockwise quantization; ``model`` changes in place.

    ``batches``: token id tensors [1, length] for calibration. Returns α per group and the summed
    calibration output error before/after (for report.json).
    """
    if model.config.model_type not in SUPPORTED:
        raise UnsupportedModelError(f"activation-aware smoothing supports {', '.join(SUPPORTED)} models, "
                                    f"not {model.config.model_type}")
    groups = _groups(model)
    recorders = [_InputRecorder(seed + i) for i in range(len(groups))]
    handles = [module.register_forward_pre_hook(rec) for (_, module, _, _), rec in zip(groups, recorders)]
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    alphas: dict[str, float] = {}
    before = after = 0.0
    for (name, _, linears, fold), rec in zip(groups, recorders):
        alpha, s, error, base = _best_alpha(rec.sample(), rec.mean_abs(), linears, bits, block)
        alphas[name] = alpha
        before += base
        after += error
        if alpha == 0.0:
            continue
        for lin in linears:
            lin.weight.data = (lin.weight.data.double() * s[None, :]).to(lin.weight.dtype)
        fold(s)
    return {"smoothing": f"activation-aware, {bits}-bit blocks of {block}", "alphas": alphas,
            "calibration_error_before": before, "calibration_error_after": after}
