"""Perplexity (and chat quality) of a freshly written bundle against the dense torch model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsvd_export.loaded import LoadedModel


def evaluate_onnx(loaded: LoadedModel, bundle: Path, text: str, windows: int) -> dict[str, Any]:
    """Perplexity of the dense torch model and of the bundle (ONNX) on ``windows`` × 512 tokens of ``text``."""
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.evaluate import torch_window_nlls
    from qsvd_export.progress import bar
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

    rows = token_windows(loaded.tokenizer, read_text(text), 512, windows, source=text)
    progress = bar(2 * len(rows), "perplexity (dense in torch, bundle in ONNX)")
    dense = perplexity(torch_window_nlls(loaded.model, rows, progress.update))
    onnx = perplexity(DecoderRunner(bundle).window_nlls(rows, progress=progress.update))
    progress.close()
    return {"text": text, "windows": len(rows), "length": 512, "dense": round(dense, 4),
            "compressed_onnx": round(onnx, 4)}


def evaluate_bundle(loaded: LoadedModel, plan: Any, bundle: Path, text: str, windows: int) -> dict[str, Any]:
    """Perplexity of the dense model and the plan-applied model (torch) and of the compiled bundle (ONNX); for a
    model with a chat template also ``chat``: the bundle's chat quality against dense torch (chat_quality.py)."""
    import copy

    from qsvd_export.compress.apply_plan import apply_plan
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.evaluate import torch_window_nlls
    from qsvd_export.progress import bar
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity

    rows = token_windows(loaded.tokenizer, read_text(text), 512, windows, source=text)
    progress = bar(3 * len(rows), "perplexity (dense, plan in torch, bundle in ONNX)")
    dense = perplexity(torch_window_nlls(loaded.model, rows, progress.update))
    compressed = perplexity(torch_window_nlls(apply_plan(copy.deepcopy(loaded.model), plan), rows, progress.update))
    onnx = perplexity(DecoderRunner(bundle).window_nlls(rows, progress=progress.update))
    progress.close()
    result = {"text": text, "windows": len(rows), "length": 512, "dense": round(dense, 4),
              "compressed_torch": round(compressed, 4), "compressed_onnx": round(onnx, 4)}
    if getattr(loaded.tokenizer, "chat_template", None):  # instruct models: chat quality of the bundle vs dense torch
        from qsvd_export.chat_quality import TorchScorer, bundle_chat_quality

        result["chat"] = bundle_chat_quality(TorchScorer(loaded.model), {"bundle": bundle}, tokenizer=loaded.tokenizer)
    return result

