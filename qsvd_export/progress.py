"""Progress reporting: tqdm bars on stderr, silenced by ``-q``."""

from __future__ import annotations

import sys
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def bar(total: int, desc: str) -> Any:
    """A tqdm bar (or a disabled one under ``-q``); call ``.update()`` and ``.close()``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=_quiet, file=sys.stderr, leave=False, dynamic_ncols=True)


def info(message: str) -> None:
    """A status line on stderr (suppressed by ``-q``)."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)
