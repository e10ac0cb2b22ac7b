"""H1: fold RMSNorm gains into the next linears, then rotate the residual stream (QuaRot, offline).

For a llama-style decoder (pre-norm RMSNorm, no norm bias): with every norm gain folded into the
linears that read the normalized stream, RMSNorm commutes with any orthogonal Q (‖xQ‖ = ‖x‖), so the
whole residual stream can live in the rotated basis h' = h·Q at no runtime cost:

- embeddings E' = E·Q;
- linears reading the stream (q/k/v, gate/up, lm_head), weights [out, in]: W' = W·Q;
- linears writing to it (o_proj, down_proj): W' = Qᵀ·W, bias b' = b·Q.

With ``online_mlp`` the input of every down_proj is rotated too (QuaRot's online rotation): down_proj
becomes ``x·Q_m`` followed by the linear with W' = W·Q_m. Q_m = A ⊗ B is a Kronecker product of a
random orthogonal A [a, a] and a randomized Hadamard B [b, b] (n = a·b, b a power of two near √n), run
as x.view(a, b) → Aᵀ·X·B: two small MatMuls (smollm2: 48×48 and 32×32 instead of one 1536×1536). The SiLU·up product has the largest activation outliers
of the block; rotating it is what lets one static 8-bit range cover it (npu ``w8a8``).

With ``online_o_proj`` the input of every o_proj (the attention output, heads × head_dim) is rotated
online too, QuaRot's rotation before out_proj: Q_o = A_h ⊗ B_d with A_h [heads, heads] mixing the heads
(a randomized Hadamard when the head count is a power of two, else random orthogonal: smollm2 has 9) and
B_d a randomized Hadamard within each head, run like the MLP's; o_proj's weight absorbs Q_oᵀ. It spreads
the heads' outliers over the whole attention output before an 8-bit (or lower) quantizer reads it.

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


def kronecker_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [a, a], B [b, b]) float64, orthogonal, n = a·b; b = the largest power of two dividing n, ≤ √n·2."""
    b = 1
    while n % (2 * b) == 0 and (2 * b) ** 2 <= 4 * n:
        b *= 2
    return random_orthogonal(n // b, seed), randomized_hadamard(b, seed + 1)


class OnlineRotation(torch.nn.Module):
    """x [..., a·b] → (Aᵀ·X·B) flattened, X = x viewed [..., a, b]: x·(A ⊗ B) without the dense matrix."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a_t", a.T.contiguous())
        self.register_buffer("b", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.unflatten(-1, (self.a_t.shape[0], self.b.shape[0]))
        return (self.a_t @ (grid @ self.b)).flatten(-2)


def head_factors(heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [heads, heads], B [head_dim, head_dim]) float64, orthogonal: the online o_proj rotation A ⊗ B."""
    return residual_rotation_matrix(heads, seed), residual_rotation_matrix(head_dim, seed + 1)


O_PROJ_SEED_OFFSET = 3  # seed + 1, + 2: the down_proj factors; + 3, + 4: the o_proj factors


@torch.no_grad()
def rotate_residual_stream(model: torch.nn.Module, seed: int = 0, online_mlp: bool = False,
                           online_o_proj: bool = False) -> dict[str, object]:
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
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or width // heads)
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_gain(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_gain(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _read_side(linear, q)
        _write_side(attn.o_proj, q)
        _write_side(mlp.down_proj, q)
        if online_mlp:
            a, b = kronecker_factors(mlp.down_proj.in_features, seed + 1)
            _read_side(mlp.down_proj, torch.kron(a, b))
            dtype = mlp.down_proj.weight.dtype
            mlp.down_proj = torch.nn.Sequential(OnlineRotation(a.to(dtype), b.to(dtype)), mlp.down_proj)
        if online_o_proj:
            a, b = head_factors(heads, head_dim, seed + O_PROJ_SEED_OFFSET)
            _read_side(attn.o_proj, torch.kron(a, b))
            dtype = attn.o_proj.weight.dtype
            attn.o_proj = torch.nn.Sequential(OnlineRotation(a.to(dtype), b.to(dtype)), attn.o_proj)
    _fold_gain(base.norm, [model.lm_head])
    _read_side(model.lm_head, q)
    base.embed_tokens.weight.data = (base.embed_tokens.weight.data.double() @ q).to(base.embed_tokens.weight.dtype)
    return {"residual_rotation": "randomized Hadamard" if width & (width - 1) == 0 else "random orthogonal",
            "width": width, "seed": seed, "norm_gains_folded": True, "online_mlp_rotation": online_mlp,
            "online_o_proj_rotation": online_o_proj, "heads": heads, "head_dim": head_dim}
