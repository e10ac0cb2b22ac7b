"""Calibration passes over token windows.

- :func:`collect_input_stats`: forward only (no LM head), hooks on each attention block's input X
  accumulate Σ|X| per channel, the token count, a fixed-size random sample of X rows for error
  measurements and, when asked, XᵀX (float64 [E, E]). Memory is O(layers · E²), independent of the
  token count.
- :func:`for_each_gradient`: one forward + backward of the LM loss (encoders: a
  random hidden-state probe, :func:`hidden_state_probe_loss`) per window, with gradients enabled
  only on the Q/K/V weights; calls back with the per-window gradients of every block.

Both passes go layer by layer through memory-mapped weights (:func:`~qsvd_export.compress.memory.layer_by_layer`),
so their resident weight pages stay bounded by a few layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from qsvd_export.compress.memory import layer_by_layer, return_freed_memory
from qsvd_export.models.projections import AttentionProjections


@dataclass
class InputStats:
    """Second-moment statistics of one attention block's input X [tokens, E]."""

    xtx: torch.Tensor | None  # float64 [E, E], Σ xᵀx (None: not collected)
    abs_sum: torch.Tensor  # float64 [E], Σ |x|
    count: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)  # float32 rows of X, at most sample_rows

    def covariance(self) -> torch.Tensor:
        if self.xtx is None:
            raise ValueError("second moments were not collected (collect_input_stats(second_moments=True))")
        return self.xtx / max(self.count, 1)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.abs_sum.shape[0], device=self.abs_sum.device)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the model's token inputs go: the device of its input embedding table."""
    return model.get_input_embeddings().weight.device


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body without its LM head (stats need no logits)."""
    return getattr(model, "base_model", model)


def collect_input_stats(
    model: torch.nn.Module,
    blocks: list[AttentionProjections],
    batches: list[dict[str, torch.Tensor]],
    sample_rows: int = 2048,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
    second_moments: bool = True,
) -> list[InputStats]:
    """Run ``batches`` (model kwargs, on the CPU) through the body and return one :class:`InputStats` per block,
    kept on the device of that block's weights. Without ``second_moments`` XᵀX is skipped (only the
    Cholesky whitening and kfac importance read it): E² float64 per layer less, and the pass's largest cost."""
    stats = []
    for block in blocks:
        dim, device = block.dims["e"], block.weights()[0].device
        stats.append(InputStats(torch.zeros(dim, dim, dtype=torch.float64, device=device) if second_moments else None,
                                torch.zeros(dim, dtype=torch.float64, device=device)))
    rng = np.random.default_rng(seed)
    rows_per_batch = max(1, sample_rows // max(len(batches), 1))
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(stat: InputStats):  # type: ignore[no-untyped-def]
        def hook(module, args):  # type: ignore[no-untyped-def]
            x = args[0].detach().to(stat.abs_sum.device)
            # the token mask applies to token rows (a VLM's vision tower sees frames × patches instead)
            if current_mask[0] is not None and tuple(x.shape[:-1]) == tuple(current_mask[0].shape):
                x = x[current_mask[0].to(x.device).bool()]
            x = x.reshape(-1, x.shape[-1])
            x64 = x.double()
            if stat.xtx is not None:
                stat.xtx += x64.T @ x64
            stat.abs_sum += x64.abs().sum(0)
            stat.count += x.shape[0]
            take = rng.choice(x.shape[0], size=min(rows_per_batch, x.shape[0]), replace=False)
            stat.sample.append(x[torch.from_numpy(np.sort(take))].float().clone())

        return hook

    handles = [b.inputs.register_forward_pre_hook(make_hook(s)) for b, s in zip(blocks, stats)]
    body = _base_model(model)
    device = input_device(model)
    try:
        with torch.no_grad(), layer_by_layer(model, [b.parent for b in blocks]) as residency:
            for batch in batches:
                batch = {name: tensor.to(device) for name, tensor in batch.items()}
                current_mask[0] = batch.get("attention_mask")
                body(**batch)
                residency.release_all()
                if progress is not None:
                    progress()
    finally:
        for handle in handles:
            handle.remove()
        return_freed_memory()
    return stats


LossFn = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, index: int) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on window ``ids`` [1, length]."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def hidden_state_probe_loss(model: torch.nn.Module, ids: torch.Tensor, index: int) -> torch.Tensor:
    """<v, h> / sqrt(T) with h the final hidden states [1, T, H] and v ~ N(0, I) seeded by ``index``.

    For encoders, which have no LM loss: its gradient g = Jᵀv satisfies E_v[g gᵀ] = JᵀJ, the
    Gauss-Newton (Fisher) matrix of the squared error of the output hidden states, so output-gradient
    Fisher statistics and first-order importance measure damage to the output embeddings.
    """
    hidden = model(input_ids=ids).last_hidden_state
    generator = torch.Generator().manual_seed(int(index))
    probe = torch.randn(hidden.shape, generator=generator, dtype=hidden.dtype).to(hidden.device)
    return (hidden * probe).sum() / hidden.shape[1] ** 0.5


GradCallback = Callable[[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[torch.Tensor] | None], None]


def for_each_gradient(
    model: torch.nn.Module,
    blocks: list[AttentionProjections],
    windows: np.ndarray,
    callback: GradCallback,
    capture_outputs: bool = False,
    progress: Callable[[], None] | None = None,
    loss_fn: LossFn = lm_loss,
) -> None:
    """For each window [length]: ``loss_fn`` backward, then ``callback(i, weight_grads, output_grads)``.

    ``weight_grads``: per block (Gq, Gk, Gv) in [out, in] (``nn.Linear``) orientation.
    ``output_grads`` (if ``capture_outputs``): per block dL/d[q|k|v] as [tokens, q+k+v], else None.
    ``requires_grad`` flags are restored afterwards.
    """
    previous = {p: p.requires_grad for p in model.parameters()}
    device = input_device(model)
    targets = [p for b in blocks for p in b.weight_params()]
    captured: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    if capture_outputs:
        for bi, block in enumerate(blocks):
            modules = [block.inputs] if block.fused_name else [getattr(block.parent, n) for n in block.names]
            for mi, module in enumerate(modules):
                def hook(mod, args, out, key=(bi, mi)):  # type: ignore[no-untyped-def]
                    out.register_hook(lambda g: captured.__setitem__(key, g.detach()))
                handles.append(module.register_forward_hook(hook))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in targets:
            p.requires_grad_(True)
        with layer_by_layer(model, [b.parent for b in blocks]) as residency:
            for i, row in enumerate(windows):
                ids = torch.from_numpy(np.asarray(row)[None, :]).to(device)
                for p in targets:
                    p.grad = None
                captured.clear()
                loss = loss_fn(model, ids, i)
                loss.backward()
                outputs = None
                if capture_outputs:
                    outputs = []
                    for bi, block in enumerate(blocks):
                        parts = [captured[(bi, mi)] for mi in range(1 if block.fused_name else 3)]
                        outputs.append(torch.cat(parts, dim=-1).reshape(-1, sum(p.shape[-1] for p in parts)))
                callback(i, [b.weight_grads() for b in blocks], outputs)
                residency.release_all()
                if progress is not None:
                    progress()
    finally:
        for handle in handles:
            handle.remove()
        for p in targets:
            p.grad = None
        for p, flag in previous.items():
            p.requires_grad_(flag)
        return_freed_memory()
