"""Command line: ``qsvd-export {export,run,eval,demo,models}``.

Every user-facing failure is a :class:`QsvdError` printed as one line with its exit code
(see ``errors.py``); ``--debug`` shows tracebacks. SIGINT/SIGTERM abort cleanly (exit 130) and leave
no partial output.

The parser is :mod:`.parser`, the option checks :mod:`.requests`, the commands :mod:`.commands`, the
printouts :mod:`.summary`.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings
from typing import Any, Sequence

from qsvd_export.cli.commands import COMMANDS
from qsvd_export.cli.parser import PROG, build_parser
from qsvd_export.errors import SIGTERM_MESSAGE, Interrupted, QsvdError, UsageError, mark_terminated, terminated
from qsvd_export.progress import emit, is_json, set_mode


def _on_sigterm(signum: int, frame: Any) -> None:
    mark_terminated()  # library code may wrap or swallow the exception: the flag survives
    raise Interrupted(SIGTERM_MESSAGE)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    set_mode("json" if "--log-json" in argv else "bars")  # errors while parsing are JSON too
    _quiet_libraries()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["compile", *argv]  # qsvd-export model.onnx ... is the graph stage
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("no command given (try: qsvd-export demo, or qsvd-export --help)")
        set_mode("json" if args.log_json else "quiet" if args.quiet else "bars")
        return COMMANDS[args.command](args)
    except QsvdError as err:
        if debug:
            traceback.print_exc()
        if terminated():  # e.g. a failure the signal caused inside a library call
            return _fail(f"error: {SIGTERM_MESSAGE}", Interrupted.exit_code)
        return _fail(f"error: {err}", err.exit_code)
    except KeyboardInterrupt:
        return _fail("error: interrupted; no output written", Interrupted.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        if terminated():  # torch's argument parsing turns the handler's exception into a TypeError
            return _fail(f"error: {SIGTERM_MESSAGE}", Interrupted.exit_code)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"internal error: {exc.__class__.__name__}: {first} (rerun with --debug)", 1)


def _fail(message: str, exit_code: int) -> int:
    """The one line a failed command ends with on stderr (a JSON ``error`` event under --log-json)."""
    if is_json():
        emit("error", message=message, exit_code=exit_code)
    else:
        print(f"{PROG}: {message}", file=sys.stderr)
    return exit_code


__all__ = ["COMMANDS", "build_parser", "main"]
