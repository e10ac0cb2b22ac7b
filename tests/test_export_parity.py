"""Dense export parity: ONNX Runtime vs transformers on every tiny family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DECODER_FAMILIES, ENCODER_FAMILIES, VISION_FAMILIES
from qsvd_export.bundle import load_bundle_config
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.sessions import create_session
from qsvd_export.zoo import load_model

TOL = 1e-4


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_prefill_and_cached_decode_match_transformers(family, bundles):
    model = load_model(f"tiny-{family}").model
    runner = DecoderRunner(bundles.dense(family))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, (2, 11))
    logits, cache = runner.prefill(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=True)
    assert np.abs(ref.logits.numpy() - logits).max() <= TOL
    ref_cache, length = ref.past_key_values, ids.shape[1]
    for _ in range(12):  # crosses gemma3's sliding window of 8
        token = rng.integers(0, model.config.vocab_size, (2, 1))
        logits, cache = runner.step(token, np.ones((2, length + 1)), np.full((2, 1), length), cache)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(token), past_key_values=ref_cache, use_cache=True)
        ref_cache, length = ref.past_key_values, length + 1
        assert np.abs(ref.logits.numpy() - logits).max() <= TOL


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_left_padded_batch_matches_transformers(family, bundles):
    model = load_model(f"tiny-{family}").model
    runner = DecoderRunner(bundles.dense(family))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, model.config.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # second row is left-padded
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, _ = runner.step(ids, mask, positions, runner.empty_cache(2))
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(ref[valid] - logits[valid]).max() <= TOL


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_greedy_generation_matches_transformers(family, bundles):
    model = load_model(f"tiny-{family}").model
    runner = DecoderRunner(bundles.dense(family))
    prompt = [5, 17, 42, 7, 99]
    ours = runner.generate(prompt, max_new_tokens=16, eos_ids=[])
    ids = torch.tensor([prompt])
    ref: list[int] = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(16):
            token = int(out.logits[0, -1].argmax())
            ref.append(token)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    assert ours == ref


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_matches_transformers(family, bundles):
    bundle = bundles.dense(family)
    model = load_model(f"tiny-{family}").model
    session = create_session(bundle / load_bundle_config(bundle).graph().filename)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.config.vocab_size, (3, 10))
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    types = np.zeros_like(ids)
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        ).last_hidden_state.numpy()
    valid = mask.astype(bool)
    assert np.abs(ref[valid] - out[valid]).max() <= TOL


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vision_encoder_matches_transformers(family, bundles):
    bundle = bundles.dense(family)
    model = load_model(f"tiny-{family}").model
    session = create_session(bundle / load_bundle_config(bundle).graph().filename)
    pixels = np.random.default_rng(4).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (out,) = session.run(None, {"pixel_values": pixels})
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert np.abs(ref - out).max() <= TOL


def test_decoder_bundle_config_describes_cache(bundles):
    config = load_bundle_config(bundles.dense("llama"))
    assert config.kind == "decoder"
    assert [layer.kind for layer in config.cache] == ["dense", "dense"]
    first = config.cache[0].tensors
    assert [t.input for t in first] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [t.output for t in first] == ["present.0.key", "present.0.value"]
    assert first[0].shape == ["batch_size", 2, "past_sequence_length", 16]
    # 2 layers x (K + V) x 2 kv heads x 16 head_dim x 4 bytes
    assert config.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    graph_inputs = config.graph().inputs
    assert graph_inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
