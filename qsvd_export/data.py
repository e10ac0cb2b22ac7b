"""Text corpora, token windows and the dev split (EVAL.md protocol).

Bundled corpora (package data, see ``corpora/README.md``): ``wiki_calib`` (calibration, and at its end the
dev split), ``wiki_eval`` (main perplexity), ``news_eval`` (second domain). Any text file path works too.

The dev split (EVAL.md: defaults are chosen on it, never on ``wiki_eval``/``news_eval``) is the end of
``wiki_calib``: the last :data:`DEV_WINDOWS` non-overlapping :data:`DEV_LENGTH`-token windows (decoders,
:func:`dev_windows`) and the last :data:`DEV_SENTENCES` sentences (encoders, :func:`dev_sentences`).
Calibration reads ``wiki_calib`` windows from the start through :func:`token_windows`, which refuses any
request that would reach the first token of either part.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.errors import BadInputError, UsageError

CORPUS_DIR = Path(__file__).parent / "corpora"
CORPORA = ("wiki_calib", "wiki_eval", "news_eval")
DEV_TEXT = "wiki_calib"
DEV_WINDOWS = 32
DEV_LENGTH = 512
DEV_SENTENCES = 256
SENTENCE_MIN_WORDS = 5
_BOUNDARY_MARGIN = 2  # tokens: a BPE merge across the sentence boundary moves it by at most this much


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


@lru_cache(maxsize=1)
def _dev_text() -> str:
    return read_text(DEV_TEXT)


def _tokens(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def sentences_with_offsets(text: str, min_words: int = SENTENCE_MIN_WORDS) -> list[tuple[int, str]]:
    """(character offset, sentence) of every sentence of ``text`` with at least ``min_words`` words, split
    as :func:`qsvd_export.evaluate.eval_sentences` splits them (lines, then '. ')."""
    out: list[tuple[int, str]] = []
    line_start = 0
    for line in text.splitlines(keepends=True):
        piece_start = line_start
        for piece in line.rstrip("\r\n").split(". "):
            if len(piece.split()) >= min_words:
                out.append((piece_start + len(piece) - len(piece.lstrip()), piece.strip()))
            piece_start += len(piece) + 2
        line_start += len(line)
    return out


def dev_sentences(count: int = DEV_SENTENCES) -> list[str]:
    """The encoder dev set: the first ``count`` of the last :data:`DEV_SENTENCES` sentences of wiki_calib."""
    if not 1 <= count <= DEV_SENTENCES:
        raise UsageError(f"the dev split has {DEV_SENTENCES} sentences; {count} requested")
    return [s for _, s in sentences_with_offsets(_dev_text())[-DEV_SENTENCES:]][:count]


def _dev_windows_start(n_tokens: int) -> int:
    available = n_tokens // DEV_LENGTH
    if available < 2 * DEV_WINDOWS:
        raise BadInputError(f"{DEV_TEXT}: {n_tokens} tokens are too few for a dev split of {DEV_WINDOWS} windows")
    return (available - DEV_WINDOWS) * DEV_LENGTH


def dev_split_start(tokenizer: Any, ids: np.ndarray | None = None) -> int:
    """First token of wiki_calib (tokenized whole with ``tokenizer``; pass ``ids`` if already done) that
    belongs to the dev split: the start of the dev windows or of the dev sentences, whichever is earlier
    (the sentence boundary is moved :data:`_BOUNDARY_MARGIN` tokens earlier, never later)."""
    text = _dev_text()
    ids = _tokens(tokenizer, text) if ids is None else ids
    first_sentence = sentences_with_offsets(text)[-DEV_SENTENCES][0]
    sentence_start = len(ids) - len(_tokens(tokenizer, text[first_sentence:])) - _BOUNDARY_MARGIN
    return max(0, min(_dev_windows_start(len(ids)), sentence_start))


def dev_windows(tokenizer: Any, count: int = DEV_WINDOWS, length: int = DEV_LENGTH) -> np.ndarray:
    """The decoder dev set: int64 [count, length] cut in order from the last :data:`DEV_WINDOWS`
    non-overlapping :data:`DEV_LENGTH`-token windows of wiki_calib (tokenized whole, no special tokens).

    ``count * length`` may not exceed those ``DEV_WINDOWS * DEV_LENGTH`` tokens (other lengths re-cut the
    same span, e.g. for static graphs)."""
    if length < 2 or count < 1:
        raise UsageError(f"need window length >= 2 and count >= 1 (got {length} x {count})")
    if count * length > DEV_WINDOWS * DEV_LENGTH:
        raise UsageError(f"the dev split holds {DEV_WINDOWS} x {DEV_LENGTH} tokens; {count} x {length} requested")
    ids = _tokens(tokenizer, _dev_text())
    start = _dev_windows_start(len(ids))
    return ids[start:start + count * length].reshape(count, length)


def token_windows(tokenizer: Any, text: str, length: int = 512, count: int = 32, source: str = "text") -> np.ndarray:
    """Tokenize ``text`` whole (no special tokens) and cut the first ``count`` non-overlapping windows.

    Returns int64 [count, length]. Raises :class:`BadInputError` if the text is too short, and
    :class:`UsageError` if ``text`` is wiki_calib and the windows would reach its dev split.
    """
    if length < 2 or count < 1:
        raise BadInputError(f"need window length >= 2 and count >= 1 (got {length} x {count})")
    ids = _tokens(tokenizer, text)
    available = len(ids) // length
    if text == _dev_text():
        limit = dev_split_start(tokenizer, ids)
        if count * length > limit:
            raise UsageError(
                f"{source}: {count} windows of {length} tokens would read into wiki_calib's dev split "
                f"(from token {limit}); at most {limit // length} windows of {length} fit before it"
            )
    if available < count:
        raise BadInputError(
            f"{source}: {len(ids)} tokens give only {available} windows of {length}; {count} requested"
        )
    return ids[: count * length].reshape(count, length)
