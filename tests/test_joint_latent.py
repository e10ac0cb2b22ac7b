"""The joint-latent oracle (benchmarks.joint_latent): full-rank latents reproduce the model, on any KV-head count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.joint_latent import FORMS, LatentOracle, patched


@pytest.fixture(scope="module")
def tiny():
    import transformers.models.llama.modeling_llama as llama

    from qsvd_export.zoo import load_model

    rope = llama.apply_rotary_pos_emb
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")  # 2 KV heads of 16 dims (smollm2 has 3 of 64)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 40)))
    with torch.no_grad():
        reference = loaded.model(input_ids=ids, use_cache=False).logits
    holder = patched(loaded.model)
    yield loaded.model, ids, reference, holder
    llama.apply_rotary_pos_emb = rope  # the oracle patches the module function


def logits_of(tiny, spec, keep):  # type: ignore[no-untyped-def]
    model, ids, _, holder = tiny
    oracle = LatentOracle(spec, keep)
    holder[:] = [oracle]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        oracle.fit()
        return model(input_ids=ids, use_cache=False).logits, oracle


@pytest.mark.parametrize("spec", [s for s in FORMS if s["form"] != "dense"], ids=lambda s: f"{s['form']}-{s['groups']}")
def test_full_rank_latents_reproduce_the_model_and_half_rank_ones_do_not(tiny, spec):
    full, oracle = logits_of(tiny, spec, 1.0)
    assert oracle.heads == 2 and torch.allclose(full, tiny[2], atol=1e-4)
    half, _ = logits_of(tiny, spec, 0.5)
    assert (half - tiny[2]).abs().max() > 1e-3
