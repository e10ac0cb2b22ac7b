"""Chat-formatted calibration windows: the model's own greedy replies to the project's calibration prompts.

An instruct model is used on chat-formatted text, while ``wiki_calib`` is prose. The windows here are each prompt
of ``corpora/chat_calib_prompts.json`` (disjoint from the chat-quality set, ``chat_prompts.json``) in the model's
chat template followed by the dense model's greedy reply, concatenated in file order and cut into ``count`` ×
``length`` tokens. Deterministic (greedy, fixed prompts). ``smooth_calibration_windows`` picks the windows for
``export --smooth-calib``: ``auto`` (default) takes them for instruct models (a chat template) and wiki_calib
otherwise; ``mixed`` takes half of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qsvd_export.errors import UsageError

CALIB_PROMPTS = Path(__file__).parent / "corpora" / "chat_calib_prompts.json"
REPLY_TOKENS = 192
SmoothCalibration = Literal["auto", "wiki", "chat", "mixed"]


def resolve_smooth_calibration(source: SmoothCalibration, tokenizer: Any) -> str:
    """``auto`` (the default): ``chat`` for a tokenizer with a chat template, else ``wiki``. Chosen on the dev split
    (smollm2 w4a8: 25.434 chat vs 25.869 wiki; docs/decisions.md)."""
    if source != "auto":
        return source
    return "chat" if getattr(tokenizer, "chat_template", None) else "wiki"


def chat_calibration_windows(model: Any, tokenizer: Any, count: int, length: int = 512,
                             reply_tokens: int = REPLY_TOKENS) -> np.ndarray:
    """int64 [count, length]: chat-formatted prompts and the dense ``model``'s greedy replies (module docstring).
    Raises :class:`UsageError` when the tokenizer has no chat template or the prompts give too few tokens."""
    from qsvd_export.chat_quality import TorchScorer, chat_ids

    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat-formatted calibration needs a tokenizer with a chat template")
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    scorer, stream = TorchScorer(model), []
    for message in json.loads(CALIB_PROMPTS.read_text(encoding="utf-8"))["prompts"]:
        ids = chat_ids(tokenizer, message)
        stream += ids + scorer.generate(ids, reply_tokens, eos)
        if len(stream) >= count * length:
            return np.asarray(stream[:count * length], dtype=np.int64).reshape(count, length)
    raise UsageError(f"the chat calibration prompts give {len(stream)} tokens, fewer than {count} x {length}")


def smooth_calibration_windows(model: Any, tokenizer: Any, source: SmoothCalibration, count: int,
                               length: int = 512) -> np.ndarray:
    """Calibration windows for smoothing: ``wiki`` (wiki_calib), ``chat`` (:func:`chat_calibration_windows`),
    ``mixed`` (the first half of the count from wiki_calib, the rest chat) or ``auto``
    (:func:`resolve_smooth_calibration`)."""
    from qsvd_export.data import read_text, token_windows

    source = resolve_smooth_calibration(source, tokenizer)  # type: ignore[assignment]

    if source == "wiki":
        return token_windows(tokenizer, read_text("wiki_calib"), length, count, source="wiki_calib")
    if source == "chat":
        return chat_calibration_windows(model, tokenizer, count, length)
    wiki = count // 2
    return np.concatenate([token_windows(tokenizer, read_text("wiki_calib"), length, wiki, source="wiki_calib"),
                           chat_calibration_windows(model, tokenizer, count - wiki, length)])
