"""Shared parity check: a decoder bundle against the torch model it should equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qsvd_export.runtimes.decode import DecoderRunner


def assert_decoder_parity(bundle: Path, model: torch.nn.Module, ids: np.ndarray, next_token: int,
                          atol: float = 1e-4) -> DecoderRunner:
    """The bundle's logits for a prefill of ``ids`` [1, n] and one cached step of ``next_token`` are within
    ``atol`` of ``model``'s (an HF causal LM, same cache semantics). Returns the runner."""
    runner = DecoderRunner(bundle)
    length = ids.shape[1]
    logits, cache = runner.prefill(ids)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), use_cache=True)
    assert np.abs(expected.logits.numpy() - logits).max() <= atol, "prefill"
    logits, _ = runner.step(np.asarray([[next_token]]), np.ones((1, length + 1)), np.asarray([[length]]), cache)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[next_token]]), past_key_values=expected.past_key_values, use_cache=True)
    assert np.abs(expected.logits.numpy() - logits).max() <= atol, "cached step"
    return runner
