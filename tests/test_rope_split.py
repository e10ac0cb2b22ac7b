"""The rope-split oracle (benchmarks.rope_split): its exact cases reproduce the model, its approximations do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.rope_split import RopeSplit, decode_macs_vs_dense, patched


@pytest.fixture(scope="module")
def tiny():
    from qsvd_export.zoo import load_model

    torch.manual_seed(0)
    loaded = load_model("tiny-llama")  # 4 query heads, 2 KV heads of 16 dims, 2 layers
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 40)))
    with torch.no_grad():
        reference = loaded.model(input_ids=ids, use_cache=False).logits
    holder: list[RopeSplit] = []
    patched(loaded.model, holder)
    return loaded.model, ids, reference, holder


def logits_of(tiny, spec):  # type: ignore[no-untyped-def]
    model, ids, _, holder = tiny
    form = RopeSplit(spec, model.model.rotary_emb.inv_freq)
    holder[:] = [form]
    with torch.no_grad():
        while form.mode != "eval":
            model(input_ids=ids, use_cache=False)
            form.fit()
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("spec", [
    {"form": "rope-split", "rope_dims": 32, "mix": True},  # every component keeps RoPE (2 heads × 16)
    {"form": "rope-split", "rope_dims": 32, "mix": True, "rank": 64},  # a full-rank latent
    {"form": "rope-split", "rope_dims": 32, "mix": True, "rank": 64, "metric": True},
    {"form": "rope-split", "rope_dims": 32, "mix": False, "groups": 2, "rank": 64, "metric": True},
    {"form": "rope-split", "rope_dims": 32, "mix": True, "rank": 64, "latent": "all-keys"},
])
def test_exact_cases_reproduce_the_model(tiny, spec):
    """A unitary mix across KV heads within a frequency commutes with RoPE: keeping every component, or a latent of
    full rank, gives the model's logits."""
    assert torch.allclose(logits_of(tiny, spec), tiny[2], atol=1e-4)


@pytest.mark.parametrize("spec", [
    {"form": "rope-split", "rope_dims": 8, "mix": True},  # most components lose RoPE
    {"form": "rope-split", "rope_dims": 32, "mix": True, "rank": 16},  # a quarter-rank latent
    {"form": "rope-split", "rope_dims": 16, "mix": True, "rank": 64, "latent": "all-keys"},
])
def test_approximations_change_the_logits(tiny, spec):
    assert (logits_of(tiny, spec) - tiny[2]).abs().max() > 1e-3


def test_decode_cost_counts_rotary_dims_latent_and_rebuild():
    heads, kv_heads, d = 9, 3, 64  # smollm2: dense reads 2 · 9 · 64 per cached token
    assert decode_macs_vs_dense({"form": "rope-split", "rope_dims": 64, "rank": 128}, heads, kv_heads, d) == 2.5
    grouped = {"form": "rope-split", "rope_dims": 72, "rank": 120, "groups": 3}
    assert decode_macs_vs_dense(grouped, heads, kv_heads, d) == pytest.approx(9 * (24 + 80) / 1152)
    rebuilt = {"form": "rope-split", "rope_dims": 96, "rank": 192, "latent": "all-keys"}
    assert decode_macs_vs_dense(rebuilt, heads, kv_heads, d) == pytest.approx((9 * (96 + 384) + 192 * 96) / 1152)
    assert decode_macs_vs_dense({"form": "rope-split", "rope_dims": 64}, heads, kv_heads, d) is None
