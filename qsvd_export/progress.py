"""Progress reporting on stderr: tqdm bars with ETA (default), nothing (``-q``), or JSON lines (``--log-json``).

JSON lines, one object per line, each with ``event`` and ``t`` (seconds since the command started):
``{"event": "info", "message": ...}``; ``{"event": "progress", "task": ..., "done": k, "total": n,
"elapsed_s": ..., "eta_s": ...}`` (at most once a second per task, and at its end);
``{"event": "task_done", "task": ..., "total": n, "elapsed_s": ...}``; the CLI adds ``{"event":
"summary", ...}`` at the end of a build and ``{"event": "error", "message": ..., "exit_code": ...}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

MODES = ("bars", "quiet", "json")
_mode = "bars"
_start = time.perf_counter()


def set_mode(mode: str) -> None:
    """``bars`` | ``quiet`` | ``json``; also restarts the ``t`` clock of JSON events."""
    global _mode, _start
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r}")
    _mode, _start = mode, time.perf_counter()


def is_json() -> bool:
    return _mode == "json"


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stderr (only in ``json`` mode)."""
    if _mode == "json":
        line = {"event": event, "t": round(time.perf_counter() - _start, 3), **fields}
        print(json.dumps(line, default=str), file=sys.stderr, flush=True)


class _JsonBar:
    """tqdm's ``update``/``close`` as rate-limited ``progress`` events."""

    def __init__(self, total: int, desc: str, interval_s: float = 1.0) -> None:
        self.total, self.desc, self.interval_s = total, desc, interval_s
        self.done = 0
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval_s or self.done >= self.total:
            self.last = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else None
            emit("progress", task=self.desc, done=self.done, total=self.total, elapsed_s=round(elapsed, 3),
                 eta_s=None if eta is None else round(eta, 1))

    def close(self) -> None:
        emit("task_done", task=self.desc, total=self.total, elapsed_s=round(time.perf_counter() - self.started, 3))


def bar(total: int, desc: str) -> Any:
    """A progress bar for ``total`` steps; call ``.update()`` per step and ``.close()`` at the end."""
    if _mode == "json":
        return _JsonBar(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=_mode == "quiet", file=sys.stderr, leave=False, dynamic_ncols=True)


def warn(message: str) -> None:
    """A warning on stderr, also under ``-q`` (a JSON ``warning`` event under ``--log-json``)."""
    if _mode == "json":
        emit("warning", message=message)
    else:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    """A status line on stderr (a JSON ``info`` event under ``--log-json``; nothing under ``-q``)."""
    if _mode == "json":
        emit("info", message=message)
    elif _mode == "bars":
        print(message, file=sys.stderr, flush=True)
