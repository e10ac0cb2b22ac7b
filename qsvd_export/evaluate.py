"""Perplexity in torch (the reference the ONNX numbers are compared with)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from qsvd_export.runtimes.metrics import window_nll


def torch_window_nlls(model: Any, windows: np.ndarray, progress: Callable[[], None] | None = None) -> list[float]:
    """Mean NLL per window with a causal LM; same protocol as the ONNX path (float64 log-softmax)."""
    import torch

    nlls = []
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=torch.from_numpy(row[None, :]), use_cache=False).logits[0]
            nlls.append(window_nll(logits.float().numpy(), row))
            if progress is not None:
                progress()
    return nlls
