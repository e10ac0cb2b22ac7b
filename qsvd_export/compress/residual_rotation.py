"""H1: fold RMSNorm gains into the next linears, then rotate the residual stream (QuaRot, offline).

For a llama-style decoder (pre-norm RMSNorm, no norm bias): with every norm gain folded into the
linears that read the normalized stream, RMSNorm commutes with any orthogonal Q (‖xQ‖ = ‖x‖), so the
whole residual stream can live in the rotated basis h' = h·Q at no runtime cost:

- embeddings E' = E·Q;
- linears reading the stream (q/k/v, gate/up, lm_head), weights [out, in]: W' = W·Q;
- linears writing to it (o_proj, down_proj): W' = Qᵀ·W, bias b' = b·Q.

With ``online_mlp`` the input of every down_proj is rotated too (QuaRot's online rotation): down_proj
becomes ``x·Q_m`` followed by the linear with W' = W·Q_m, exported as one extra MatMul with a constant
[intermediate, intermediate] orthogonal matrix. The SiLU·up product has the largest activation outliers
of the block; rotating it is what lets one static 8-bit range cover it (npu ``w8a8``).

The outputs are unchanged in exact arithmetic (fp32: ~1e-5); the point is that rotated weights have no
outlier input channels, so they quantize far better at 4 bits. Tied embeddings are untied (the lm_head
absorbs the final norm gain, the embedding does not). Q is a seeded Haar-random orthogonal matrix
(a randomized Hadamard when the width is a power of two).
"""

from __future__ import annotations

import torch

from qsvd_export.compress.rotation import random_orthogonal, randomized_hadamard
from qsvd_export.errors import UnsupportedModelError

SUPPORTED = ("llama", "qwen2", "mistral", "qwen3")


def residual_rotation_matrix(width: int, seed: int) -> torch.Tensor:
    """Q [width, width] float64."""
    if width & (width - 1) == 0:
        return randomized_hadamard(width, seed)
    return random_orthogonal(width, seed)


def _fold_gain(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    gain = norm.weight.data.double()
    for linear in readers:
        linear.weight.data = (linear.weight.data.double() * gain[None, :]).to(linear.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def _read_side(linear: torch.nn.Linear, q: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.double() @ q).to(linear.weight.dtype)


def _write_side(linear: torch.nn.Linear, q: torch.Tensor) -> None:
    linear.weight.data = (q.T @ linear.weight.data.double()).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.double() @ q).to(linear.bias.dtype)


class OnlineRotation(torch.nn.Module):
    """x [..., n] → x·Q (Q [n, n] orthogonal, a buffer: exported as a constant MatMul)."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q


@torch.no_grad()
def rotate_residual_stream(model: torch.nn.Module, seed: int = 0, online_mlp: bool = False) -> dict[str, object]:
    """Fold norms and rotate ``model`` (a ``*ForCausalLM``) in place; returns a summary for reports."""
    config = model.config
    if config.model_type not in SUPPORTED:
        raise UnsupportedModelError(f"residual rotation supports {', '.join(SUPPORTED)} models, "
                                    f"not {config.model_type}")
    base = model.model
    if getattr(config, "tie_word_embeddings", False) or model.lm_head.weight is base.embed_tokens.weight:
        model.lm_head.weight = torch.nn.Parameter(base.embed_tokens.weight.data.clone())
        config.tie_word_embeddings = False
    width = config.hidden_size
    q = residual_rotation_matrix(width, seed)
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_gain(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_gain(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _read_side(linear, q)
        _write_side(attn.o_proj, q)
        _write_side(mlp.down_proj, q)
        if online_mlp:
            q_mlp = residual_rotation_matrix(mlp.down_proj.in_features, seed + 1)
            _read_side(mlp.down_proj, q_mlp)
            mlp.down_proj = torch.nn.Sequential(OnlineRotation(q_mlp.to(mlp.down_proj.weight.dtype)), mlp.down_proj)
    _fold_gain(base.norm, [model.lm_head])
    _read_side(model.lm_head, q)
    base.embed_tokens.weight.data = (base.embed_tokens.weight.data.double() @ q).to(base.embed_tokens.weight.dtype)
    return {"residual_rotation": "randomized Hadamard" if width & (width - 1) == 0 else "random orthogonal",
            "width": width, "seed": seed, "norm_gains_folded": True, "online_mlp_rotation": online_mlp}
