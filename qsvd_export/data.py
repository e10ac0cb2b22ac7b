"""Text corpora and token windows (EVAL.md protocol).

Bundled corpora (package data, see ``corpora/README.md``): ``wiki_calib`` (calibration only),
``wiki_eval`` (main perplexity), ``news_eval`` (second domain). Any text file path works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.errors import BadInputError

CORPUS_DIR = Path(__file__).parent / "corpora"
CORPORA = ("wiki_calib", "wiki_eval", "news_eval")


def resolve_text(name_or_path: str | Path) -> Path:
    """A bundled corpus name (``wiki_eval``) or a path to a UTF-8 text file."""
    if str(name_or_path) in CORPORA:
        return CORPUS_DIR / f"{name_or_path}.txt"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise BadInputError(f"text file {name_or_path} not found (bundled corpora: {', '.join(CORPORA)})")
    return path


def read_text(name_or_path: str | Path) -> str:
    path = resolve_text(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise BadInputError(f"{path}: empty text file")
    return text


def token_windows(tokenizer: Any, text: str, length: int = 512, count: int = 32, source: str = "text") -> np.ndarray:
    """Tokenize ``text`` whole (no special tokens) and cut the first ``count`` non-overlapping windows.

    Returns int64 [count, length]. Raises :class:`BadInputError` if the text is too short.
    """
    if length < 2 or count < 1:
        raise BadInputError(f"need window length >= 2 and count >= 1 (got {length} x {count})")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    available = len(ids) // length
    if available < count:
        raise BadInputError(
            f"{source}: {len(ids)} tokens give only {available} windows of {length}; {count} requested"
        )
    return ids[: count * length].reshape(count, length)
