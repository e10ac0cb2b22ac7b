"""What a benchmark prints and keeps: its result as indented JSON on stdout and, when asked, in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_json(result: dict[str, Any], path: Path | None) -> None:
    """Print ``result`` as JSON (indent 1) and write the same text to ``path`` (parents created) when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
