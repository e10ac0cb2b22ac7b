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


def sentence_embeddings(model: Any, tokenizer: Any, sentences: list[str], batch: int = 32,
                        max_length: int = 128) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings [n, hidden] (sentence-transformers recipe)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch):
            enc = tokenizer(sentences[start:start + batch], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def embedding_cosine(dense: np.ndarray, compressed: np.ndarray) -> float:
    """Mean cosine similarity of matching rows of two L2-normalised embedding matrices."""
    return float(np.mean(np.sum(dense * compressed, axis=1)))


def eval_sentences(text: str, count: int = 256, min_words: int = 5) -> list[str]:
    """The first ``count`` sentences (split on '. ') of ``text`` with at least ``min_words`` words."""
    sentences = []
    for paragraph in text.splitlines():
        for sentence in paragraph.split(". "):
            if len(sentence.split()) >= min_words:
                sentences.append(sentence.strip())
                if len(sentences) == count:
                    return sentences
    return sentences
