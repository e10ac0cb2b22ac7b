"""Can a latent skip the per-step key rebuild? Keep a few rotary components exact, drop RoPE from the rest
(torch oracle, issue 22's MAC floor).

    python -m benchmarks.rope_split [--model smollm2-135m] [--calib-windows 16] [--windows 8] [--json OUT]

QSVD's latent is taken before RoPE, so every decode step rebuilds and re-rotates the keys of every cached
token (12× the dense step's multiply-adds at 2,048 tokens). A latent that the query can be mapped into
(absorbed, no rebuild) must commute with RoPE. The forms measured here (MLA's decoupled RoPE, and
TransMLA's RoRoPE: a unitary mix of the KV heads within each rotary frequency commutes with RoPE exactly)
split each layer's keys, in complex rotary coordinates ``z[g, i] = k[g, i] + j·k[g, i + D/2]`` (HF's
rotate-half layout), into:

- a **rotary part**: ``rope_dims`` real dims per layer (``rope_dims / 2`` complex components), cached after
  RoPE and scored exactly (each query head maps into them: ``heads · rope_dims`` multiply-adds per token);
- a **position-free part**: the other components lose RoPE (the query's matching components are taken
  before RoPE too: that is the approximation), and are cached with the values in one joint latent of
  ``rank`` dims (None: not compressed), absorbed (``2 · heads · rank`` multiply-adds per token).

Options of a form: ``mix``: the components are the eigenvectors of each frequency's KV-head second moment
(RoRoPE); without it, the heads themselves. Components are ranked per layer by key energy × matching query
energy × the mean ``1 − cos(d·θ_i)`` over distances d up to 512 (what dropping RoPE costs a component of
frequency θ_i). The latent is plain PCA of the uncentered second moment, or with ``metric`` PCA in the metric of
the score error (keys weighted by their queries' second moment) and of the output error (values by the output
projection's rows), the two halves balanced to equal energy × ``kv_weight``. ``groups`` 3: one latent and one
rotary part per KV head, so a query head reads only its own group's. ``latent`` "all-keys": QSVD's joint
pre-RoPE latent of every key and value; only the rotary part is rebuilt from it per cached token (``rank ·
rope_dims`` multiply-adds), the position-free keys and the values are absorbed.

Scored by perplexity on ``--windows`` × 512 dev-split tokens (the last windows of wiki_calib), calibrated on
``--calib-windows`` × 512 wiki_calib tokens: the setting of ``benchmarks.joint_latent`` (joint pre-RoPE latent
at half the cache: 1.407× dense there, ``results/joint_latent_dev_smollm2.json``).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from benchmarks.joint_latent import _rotate_half, oracle_inputs, oracle_parser, write_result

FORMS: list[dict[str, Any]] = [
    {"form": "dense"},
    # RoPE dropped from some key components, nothing compressed: what the split alone costs
    {"form": "nope-low", "rope_dims": 144, "mix": False},
    {"form": "nope-low", "rope_dims": 96, "mix": False},
    {"form": "rope-split", "rope_dims": 96, "mix": False},
    {"form": "rope-split", "rope_dims": 96, "mix": True},
    {"form": "rope-split", "rope_dims": 64, "mix": True},
    # absorbed: rotary part cached exactly, position-free keys + values in one latent (half the cache)
    {"form": "rope-split", "rope_dims": 64, "mix": True, "rank": 128},
    {"form": "rope-split", "rope_dims": 96, "mix": True, "rank": 96},
    {"form": "rope-split", "rope_dims": 128, "mix": True, "rank": 64},
    {"form": "rope-split", "rope_dims": 64, "mix": True, "rank": 128, "metric": True},
    {"form": "rope-split", "rope_dims": 96, "mix": True, "rank": 96, "metric": True},
    {"form": "rope-split", "rope_dims": 32, "mix": True, "rank": 160, "metric": True},
    {"form": "rope-split", "rope_dims": 64, "mix": True, "rank": 128, "metric": True, "kv_weight": 0.5},
    {"form": "rope-split", "rope_dims": 64, "mix": True, "rank": 128, "metric": True, "kv_weight": 2.0},
    # one latent per KV head (a query head reads its own group only: below dense's multiply-adds)
    {"form": "rope-split", "rope_dims": 72, "mix": False, "groups": 3, "rank": 120, "metric": True},
    {"form": "rope-split", "rope_dims": 48, "mix": False, "groups": 3, "rank": 144, "metric": True},
    {"form": "rope-split", "rope_dims": 96, "mix": False, "groups": 3, "rank": 192, "metric": True},
    {"form": "rope-split", "rope_dims": 72, "mix": False, "groups": 3, "rank": 216, "metric": True},
    # QSVD's pre-RoPE joint latent with only the rotary part rebuilt per cached token, the rest absorbed
    {"form": "rope-split", "rope_dims": 192, "mix": True, "rank": 192, "latent": "all-keys"},
    {"form": "rope-split", "rope_dims": 96, "mix": True, "rank": 192, "latent": "all-keys"},
    {"form": "rope-split", "rope_dims": 64, "mix": True, "rank": 192, "latent": "all-keys"},
    {"form": "rope-split", "rope_dims": 32, "mix": True, "rank": 192, "latent": "all-keys"},
    {"form": "rope-split", "rope_dims": 0, "mix": True, "rank": 192, "latent": "all-keys"},  # no RoPE at all
]
DISTANCE = 512


def _complex(x: torch.Tensor) -> torch.Tensor:
    """[..., D] rotate-half real layout → [..., D/2] complex."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].double(), x[..., half:].double())


def _real(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


class RopeSplit:
    """One form's state over the passes: "rotations" (frequency moments), "latent" (moments of the
    position-free keys with the values), then "eval"."""

    def __init__(self, spec: dict[str, Any], inv_freq: torch.Tensor) -> None:
        self.spec = spec
        self.mode = "rotations"
        self.inv_freq = inv_freq.double()
        self.freq_moments: dict[int, torch.Tensor] = {}  # [F, G, G] complex
        self.query_energy: dict[int, torch.Tensor] = {}  # [G, F]
        self.mixes: dict[int, torch.Tensor] = {}  # [F, G, G] unitary, columns = components
        self.keep: dict[int, torch.Tensor] = {}  # [F, G] bool: component kept rotary
        self.latent_moments: dict[int, torch.Tensor] = {}
        self.query_moments: dict[int, torch.Tensor] = {}  # [G, D, D] real, before RoPE
        self.output_grams: dict[int, torch.Tensor] = {}  # [G, D, D]: Σ_h∈g W_o,hᵀ W_o,h
        self.metrics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # whiten, unwhiten [2·G·D]²
        self.bases: dict[int, torch.Tensor] = {}

    def fit(self) -> None:
        """Fit what the pass just collected ("rotations": mixes, kept components, metrics; "latent": the bases)."""
        if self.mode == "rotations":
            self.fit_rotations()
            self.fit_metrics()
        else:
            self.fit_latent()

    def collect_rotations(self, layer: int, zq: torch.Tensor, zk: torch.Tensor, plain_q: torch.Tensor,
                          o_proj: torch.Tensor) -> None:
        """zq [H, T, F], zk [G, T, F] complex, plain_q [H, T, D] real, all before RoPE; o_proj [hidden, H·D]."""
        groups, heads, d = zk.shape[0], zq.shape[0], plain_q.shape[-1]
        q = plain_q.double().reshape(groups, heads // groups, -1, d)
        self.query_moments[layer] = self.query_moments.get(layer, 0) + torch.einsum("gptd,gpte->gde", q, q)
        if layer not in self.output_grams:
            w = o_proj.double().reshape(-1, groups, heads // groups, d)
            self.output_grams[layer] = torch.einsum("ogpd,ogpe->gde", w, w)
        moment = torch.einsum("gtf,htf->fgh", zk, zk.conj())
        self.freq_moments[layer] = self.freq_moments.get(layer, 0) + moment
        heads, groups = zq.shape[0], zk.shape[0]
        energy = (zq.abs() ** 2).sum(1).reshape(groups, heads // groups, -1).sum(1)
        self.query_energy[layer] = self.query_energy.get(layer, 0) + energy

    def fit_rotations(self) -> None:
        angles = torch.arange(1, DISTANCE + 1, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        cost = (1 - torch.cos(angles)).mean(0)  # [F]
        for layer, moment in self.freq_moments.items():
            groups = moment.shape[1]
            if self.spec.get("mix"):
                values, vectors = torch.linalg.eigh(moment)  # ascending
                values, vectors = values.flip(-1), vectors.flip(-1)
            else:
                values = torch.diagonal(moment, dim1=1, dim2=2).real
                vectors = torch.eye(groups, dtype=moment.dtype).expand_as(moment).clone()
            query = torch.einsum("fgj,gf->fj", vectors.abs() ** 2, self.query_energy[layer])
            if self.spec["form"] == "nope-low":
                score = torch.arange(cost.shape[0], 0, -1, dtype=torch.float64)[:, None].expand(-1, groups)
            else:
                score = values.clamp(min=0) * query * cost[:, None]
            if self.spec.get("groups", 1) == 1:
                order = score.flatten().argsort(descending=True)[: self.spec["rope_dims"] // 2]
                keep = torch.zeros(score.numel(), dtype=torch.bool)
                keep[order] = True
                keep = keep.reshape(score.shape)
            else:  # one group per KV head (no mixing): each head keeps its own top components
                keep = torch.zeros(score.shape, dtype=torch.bool)
                for g in range(groups):
                    keep[score[:, g].argsort(descending=True)[: self.spec["rope_dims"] // (2 * groups)], g] = True
            self.mixes[layer], self.keep[layer] = vectors, keep
        self.mode = "latent" if self.spec.get("rank") else "eval"

    def split(self, layer: int, zk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """zk [G, T, F] → (rotary part, position-free part), both [G, T, F] complex in head space."""
        mix, keep = self.mixes[layer], self.keep[layer]
        comp = torch.einsum("fgj,gtf->jtf", mix.conj(), zk)  # components
        kept = comp * keep.T[:, None, :]
        rotary = torch.einsum("fgj,jtf->gtf", mix, kept)
        return rotary, zk - rotary

    def latent(self, layer: int, free: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """[T, G·D + G·D] rows of the joint latent: position-free keys (real layout) and values."""
        tokens = free.shape[1]
        k = _real(free).transpose(0, 1).reshape(tokens, -1)
        v = value.double().transpose(0, 1).reshape(tokens, -1)
        return torch.cat([k, v], dim=1)

    def fit_metrics(self) -> None:
        """Per layer, the whitening of the latent rows: keys in their queries' metric (score error), values
        in the output projection's (output error), the two parts balanced to equal energy × ``kv_weight``."""
        def root(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values, vectors = torch.linalg.eigh(m)
            values = values.clamp(min=values.max() * 1e-9)
            return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T

        for layer, queries in self.query_moments.items():
            parts = [root(m) for m in queries] + [root(m) for m in self.output_grams[layer]]
            whiten = torch.block_diag(*[p[0] for p in parts])
            unwhiten = torch.block_diag(*[p[1] for p in parts])
            self.metrics[layer] = (whiten, unwhiten)

    def fit_latent(self) -> None:
        groups = self.spec.get("groups", 1)
        if groups == 1:
            self._fit_latent_of(self.latent_moments, self.metrics, self.spec["rank"])
            return
        for layer, moment in self.latent_moments.items():  # one latent per KV head: [k_g, v_g] rows
            width = moment.shape[0] // (2 * groups)
            downs, ups = [], []
            for g in range(groups):
                idx = torch.cat([torch.arange(g * width, (g + 1) * width),
                                 torch.arange((groups + g) * width, (groups + g + 1) * width)])
                whiten, unwhiten = self.metrics[layer]
                part = {layer: moment[idx][:, idx]}
                metric = {layer: (whiten[idx][:, idx], unwhiten[idx][:, idx])}
                self._fit_latent_of(part, metric, self.spec["rank"] // groups)
                down, up = self.bases[layer]
                full_down = torch.zeros(moment.shape[0], down.shape[1], dtype=down.dtype)
                full_up = torch.zeros(up.shape[0], moment.shape[0], dtype=up.dtype)
                full_down[idx], full_up[:, idx] = down, up
                downs.append(full_down)
                ups.append(full_up)
            self.bases[layer] = (torch.cat(downs, dim=1), torch.cat(ups, dim=0))
        self.mode = "eval"

    def _fit_latent_of(self, moments: dict[int, torch.Tensor], metrics: dict[int, Any], rank: int) -> None:
        metric = self.spec.get("metric", False)
        for layer, moment in moments.items():
            if metric:
                whiten, unwhiten = metrics[layer]
                moment = whiten.T @ moment @ whiten
                half = moment.shape[0] // 2
                keys, values = torch.trace(moment[:half, :half]), torch.trace(moment[half:, half:])
                balance = (values / keys).sqrt() if keys > 1e-12 * values else 1.0  # no position-free keys: as is
                scale = torch.ones(moment.shape[0], dtype=moment.dtype)
                scale[:half] = balance * self.spec.get("kv_weight", 1.0)
                moment = moment * scale[:, None] * scale[None, :]
                _, vectors = torch.linalg.eigh(moment)
                basis = vectors[:, -rank:]
                # rows ↦ rows · W · S · B · Bᵀ · S⁻¹ · W⁻¹ (an oblique projection in the rows' own coordinates)
                down = whiten @ (scale[:, None] * basis)
                up = (basis.T / scale[None, :]) @ unwhiten
                self.bases[layer] = (down, up)
            else:
                _, vectors = torch.linalg.eigh(moment)
                basis = vectors[:, -rank:]
                self.bases[layer] = (basis, basis.T)
        self.mode = "eval"


def patched(model: Any, holder: list[RopeSplit]) -> None:
    """Route the model's attention through ``holder[0]`` (Llama-family attention, batch 1)."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rope = llama.apply_rotary_pos_emb
    rotary: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remember(q, k, cos, sin, *args, **kwargs):  # type: ignore[no-untyped-def]
        rotary[:] = [(cos, sin)]
        return rope(q, k, cos, sin, *args, **kwargs)

    llama.apply_rotary_pos_emb = remember

    def attention(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        form = holder[0]
        if form.spec["form"] == "dense":
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        cos, sin = (t.unsqueeze(1) for t in rotary[0])
        plain_q = (query * cos - _rotate_half(query) * sin)[0]
        plain_k = (key * cos - _rotate_half(key) * sin)[0]
        zq, zk, layer = _complex(plain_q), _complex(plain_k), module.layer_idx
        if form.mode == "rotations":
            form.collect_rotations(layer, zq, zk, plain_q, module.o_proj.weight)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        whole = form.spec.get("latent") == "all-keys"  # the latent holds every key before RoPE
        rotary_part, free = form.split(layer, zk)
        if form.mode == "latent":
            rows = form.latent(layer, zk if whole else free, value[0])
            form.latent_moments[layer] = form.latent_moments.get(layer, 0) + rows.T @ rows
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        groups, tokens, d = key.shape[1], key.shape[2], key.shape[3]
        if form.spec.get("rank"):
            rows = form.latent(layer, zk if whole else free, value[0])
            down, up = form.bases[layer]
            rows = rows @ down @ up
            free = _complex(rows[:, :groups * d].reshape(tokens, groups, d).transpose(0, 1))
            if whole:  # the rotary part is rebuilt from the latent per cached token, the rest absorbed
                rotary_part, free = form.split(layer, free)
            value = rows[:, groups * d:].reshape(tokens, groups, d).transpose(0, 1)[None].to(value.dtype)
        k_rope = _real(rotary_part).to(key.dtype)[None]
        k_rope = k_rope * cos + _rotate_half(k_rope) * sin
        keys = torch.cat([k_rope, _real(free).to(key.dtype)[None]], dim=-1)
        queries = torch.cat([query, plain_q[None]], dim=-1)
        return sdpa_attention_forward(module, queries, keys, value, attention_mask, **kwargs)

    AttentionInterface.register("rope_split", attention)
    model.set_attn_implementation("rope_split")


def decode_macs_vs_dense(spec: dict[str, Any], heads: int, kv_heads: int, head_dim: int) -> float | None:
    """Attention multiply-adds per cached token of the absorbed form ÷ dense's (2 · heads · head_dim)."""
    if spec["form"] == "dense" or not spec.get("rank"):
        return None
    groups = spec.get("groups", 1)  # a query head reads its own group's rotary dims and latent only
    macs = heads * (spec["rope_dims"] + 2 * spec["rank"]) / groups
    if spec.get("latent") == "all-keys":  # plus the rotary part rebuilt from the latent per cached token
        macs += spec["rank"] * spec["rope_dims"]
    return macs / (2 * heads * head_dim)


def main(argv: list[str] | None = None) -> None:
    from qsvd_export.evaluate import torch_window_nlls
    from qsvd_export.runtimes.metrics import perplexity

    args = oracle_parser(__doc__.splitlines()[0]).parse_args(argv)
    loaded, calib, dev = oracle_inputs(args)
    config = loaded.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = loaded.model.model.rotary_emb.inv_freq
    dense_values = 2 * config.num_key_value_heads * head_dim
    holder: list[RopeSplit] = []
    patched(loaded.model, holder)
    rows = []
    for spec in FORMS:
        form = RopeSplit(spec, inv_freq)
        holder[:] = [form]
        if spec["form"] != "dense":
            while form.mode != "eval":
                torch_window_nlls(loaded.model, calib)
                form.fit()
        ppl = perplexity(torch_window_nlls(loaded.model, dev))
        cached = None if not spec.get("rank") else (
            spec["rank"] if spec.get("latent") == "all-keys" else spec["rope_dims"] + spec["rank"])
        row = {**spec, "dev_ppl": round(ppl, 4),
               "cache_fraction": round(cached / dense_values, 4) if cached else None,
               "attention_macs_vs_dense": decode_macs_vs_dense(spec, config.num_attention_heads,
                                                               config.num_key_value_heads, head_dim)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result({"model": args.model, "calib": f"{args.calib_windows} x 512 wiki_calib",
                  "eval": f"dev {args.windows} x 512", "distance_for_ranking": DISTANCE,
                  "fit": "plain PCA of the uncentered second moment, or the score/output metric where 'metric' is "
                         "set; one rank for every layer", "rows": rows,
                  "reproduce": "python -m benchmarks.rope_split --json results/rope_split_dev_smollm2.json"},
                 args.json)


if __name__ == "__main__":
    main()
