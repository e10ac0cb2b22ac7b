"""Which KV latent keeps quality at half the cache: joint or separate, before or after RoPE (torch oracle).

    python -m benchmarks.joint_latent [--model smollm2-135m] [--keep 0.5] [--calib-windows 16] [--windows 8]
        [--json OUT]

Each form replaces, inside the model's attention, every layer's keys and values by their projection onto the
top principal directions (uncentered second moment, plain PCA, the same rank budget for every form: ``--keep``
of the layer's 2 · kv_heads · head_dim cached values) calibrated on ``--calib-windows`` × 512 wiki_calib tokens
and scored by perplexity on ``--windows`` × 512 dev-split tokens (the last windows of wiki_calib, never
calibrated on). The projection is what a cache of that latent holds, so the perplexity is the quality of the
form whatever kernel runs it (absorbed or rebuilt):

- ``joint-pre-rope``: one latent of [K, V] before RoPE (QSVD's cache; keys must be re-rotated per cached token);
- ``joint-post-rope`` (``groups`` 1 or one per KV head): one latent of [RoPE(K), V] per group, absorbable: a
  query maps into it for the scores and P·C maps back through the values' rows, one buffer serving both;
- ``separate-post-rope``: RoPE(K) and V each with half the rank (fused GroupQueryAttention's constraint);
- ``partial-rope`` (``exact`` dims per head): each head's ``exact`` highest-frequency rotary dims cached as they
  are (RoPE applied), the other key dims (after RoPE) and V in one latent with the rest of the budget;
- ``dense``: no projection.

Prints and writes one JSON with every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

FORMS = [
    {"form": "dense"},
    {"form": "joint-pre-rope", "groups": 1},
    {"form": "joint-post-rope", "groups": 1},
    {"form": "joint-post-rope", "groups": "kv_heads"},  # one latent per KV head (3 on smollm2)
    {"form": "separate-post-rope", "groups": 1},
    {"form": "partial-rope", "groups": 1, "exact": 16},
    {"form": "partial-rope", "groups": 1, "exact": 32},
]


class LatentOracle:
    """State of the patched attention: ``mode`` "collect" (second moments) or "project" (apply ``bases``)."""

    def __init__(self, spec: dict[str, Any], keep: float) -> None:
        self.spec, self.keep = spec, keep
        self.mode = "collect"
        self.moments: dict[tuple[int, int], torch.Tensor] = {}
        self.bases: dict[tuple[int, int], torch.Tensor] = {}
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.heads = 0  # KV heads, seen on the first call

    def exact_dims(self, d: int) -> torch.Tensor:
        """A head's ``exact`` highest-frequency rotary dims (HF's rotate-half layout pairs i and i + d/2)."""
        half = self.spec.get("exact", 0) // 2
        mask = torch.zeros(d, dtype=torch.bool)
        mask[:half], mask[d // 2:d // 2 + half] = True, True
        return mask

    def blocks(self, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        """[tokens, width] matrices the form compresses, from key/value [1, kv_heads, T, D]."""
        heads = key.shape[1]
        if self.spec["form"] == "partial-rope":
            rest = key[..., ~self.exact_dims(key.shape[3])]
            k = rest[0].transpose(0, 1).reshape(key.shape[2], -1)
            return [torch.cat([k, value[0].transpose(0, 1).reshape(value.shape[2], -1)], dim=1)]
        k = key[0].transpose(0, 1).reshape(key.shape[2], -1)  # [T, heads·D], head-major
        v = value[0].transpose(0, 1).reshape(value.shape[2], -1)
        if self.spec["form"] == "separate-post-rope":
            return [k, v]
        groups = heads if self.spec["groups"] == "kv_heads" else self.spec["groups"]
        per = heads // groups
        d = key.shape[3]
        return [torch.cat([k[:, g * per * d:(g + 1) * per * d], v[:, g * per * d:(g + 1) * per * d]], dim=1)
                for g in range(groups)]

    def unblocks(self, blocks: list[torch.Tensor], key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads, tokens, d = key.shape[1], key.shape[2], key.shape[3]
        if self.spec["form"] == "partial-rope":
            mask = self.exact_dims(d)
            width = heads * int((~mask).sum())
            rest = blocks[0][:, :width].reshape(tokens, heads, -1).transpose(0, 1)[None]
            out = key.clone()
            out[..., ~mask] = rest.to(key.dtype)
            return out, blocks[0][:, width:].reshape(tokens, heads, d).transpose(0, 1)[None]
        if self.spec["form"] == "separate-post-rope":
            k, v = blocks
        else:
            half = [b.shape[1] // 2 for b in blocks]
            k = torch.cat([b[:, :h] for b, h in zip(blocks, half)], dim=1)
            v = torch.cat([b[:, h:] for b, h in zip(blocks, half)], dim=1)
        shape = lambda x: x.reshape(tokens, heads, d).transpose(0, 1)[None]  # noqa: E731
        return shape(k), shape(v)

    def __call__(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.heads = key.shape[1]
        blocks = self.blocks(key.float(), value.float())
        if self.mode == "collect":
            for i, block in enumerate(blocks):
                moment = block.T.double() @ block.double()
                self.moments[(layer, i)] = self.moments.get((layer, i), 0) + moment
            return key, value
        out = []
        for i, block in enumerate(blocks):
            basis = self.bases[(layer, i)]
            out.append(block @ basis @ basis.T)
        k, v = self.unblocks(out, key)
        return k.to(key.dtype), v.to(value.dtype)

    def fit(self) -> None:
        for (layer, i), moment in self.moments.items():
            _, vectors = torch.linalg.eigh(moment)  # ascending eigenvalues
            width = moment.shape[0]
            if self.spec["form"] == "partial-rope":  # the exact dims take their share of the budget
                exact = self.heads * self.spec["exact"]
                rank = round(self.keep * (width + exact)) - exact
            else:
                rank = round(self.keep * width)
            self.bases[(layer, i)] = vectors[:, -max(1, rank):].float()
        self.mode = "project"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def patched(model: Any) -> list[LatentOracle]:
    """Route the model's attention through the oracle put in the returned holder (keys after RoPE;
    joint-pre-rope un-rotates them first). Llama-family attention only."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    holder: list[LatentOracle] = []
    rope = llama.apply_rotary_pos_emb

    def remember(q, k, cos, sin, *args, **kwargs):  # type: ignore[no-untyped-def]
        holder[0].rotary = (cos, sin)
        return rope(q, k, cos, sin, *args, **kwargs)

    llama.apply_rotary_pos_emb = remember

    def attention(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        oracle = holder[0]
        if oracle.spec["form"] != "dense":
            if oracle.spec["form"] == "joint-pre-rope":
                cos, sin = (t.unsqueeze(1) for t in oracle.rotary)  # type: ignore[union-attr]
                plain = key * cos - _rotate_half(key) * sin
                plain, value = oracle(module.layer_idx, plain, value)
                key = plain * cos + _rotate_half(plain) * sin
            else:
                key, value = oracle(module.layer_idx, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("latent_oracle", attention)
    model.set_attn_implementation("latent_oracle")
    return holder


def oracle_parser(description: str) -> argparse.ArgumentParser:
    """The options every torch-oracle benchmark takes: model, calibration and dev windows, JSON output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    return parser


def oracle_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(loaded model, calibration windows [calib_windows, 512] of wiki_calib, dev windows [windows, 512]), with
    autograd off."""
    from qsvd_export.data import dev_windows, read_text, token_windows
    from qsvd_export.zoo import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    calib = token_windows(loaded.tokenizer, read_text("wiki_calib"), 512, args.calib_windows, source="wiki_calib")
    return loaded, calib, dev_windows(loaded.tokenizer, args.windows, 512)


def main(argv: list[str] | None = None) -> None:
    from qsvd_export.evaluate import torch_window_nlls
    from qsvd_export.runtimes.metrics import perplexity

    parser = oracle_parser(__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="cached values kept, of the dense cache")
    args = parser.parse_args(argv)
    loaded, calib, dev = oracle_inputs(args)
    rows = []
    holder = patched(loaded.model)
    for spec in FORMS:
        oracle = LatentOracle(spec, args.keep)
        holder[:] = [oracle]
        if spec["form"] != "dense":
            torch_window_nlls(loaded.model, calib)
            oracle.fit()
        ppl = perplexity(torch_window_nlls(loaded.model, dev))
        rows.append({**spec, "keep": args.keep if spec["form"] != "dense" else 1.0, "dev_ppl": round(ppl, 4)})
        if spec.get("groups") == "kv_heads":
            rows[-1]["groups"] = oracle.heads
        print(json.dumps(rows[-1]), flush=True)
    write_result({"model": args.model, "calib": f"{args.calib_windows} x 512 wiki_calib",
                  "eval": f"dev {args.windows} x 512",
                  "fit": "plain PCA of the uncentered second moment, uniform rank per layer", "rows": rows,
                  "reproduce": "python -m benchmarks.joint_latent --json results/joint_latent_dev_smollm2.json"},
                 args.json)


def write_result(result: dict[str, Any], path: Path | None) -> None:
    """Add each row's ``ratio`` to the first (dense) row's perplexity, print the result and write it to ``path``."""
    dense = result["rows"][0]["dev_ppl"]
    for row in result["rows"]:
        row["ratio"] = round(row["dev_ppl"] / dense, 4)
    text = json.dumps(result, indent=1)
    print(text)
    if path is not None:
        path.write_text(text + "\n")


if __name__ == "__main__":
    main()
