"""Metrics shared by the torch and ONNX paths so both follow EVAL.md's protocol exactly."""

from __future__ import annotations

import numpy as np


def window_nll(logits: np.ndarray, token_ids: np.ndarray) -> float:
    """Mean next-token NLL of one window.

    ``logits`` [seq, vocab] for positions 0..seq-1, ``token_ids`` [seq]; the seq-1 predictions
    (position t predicts token t+1) are averaged. Computed in float64.
    """
    pred = logits[:-1].astype(np.float64)
    target = token_ids[1:]
    peak = pred.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(pred - peak).sum(axis=-1)) + peak[:, 0]
    return float(np.mean(log_norm - pred[np.arange(len(target)), target]))


def perplexity(nlls: list[float]) -> float:
    """exp(mean NLL) over windows of equal length."""
    return float(np.exp(np.mean(nlls)))
