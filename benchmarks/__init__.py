"""Benchmarks: scripts that print figures (quality, speed, memory); run as ``python -m benchmarks.<name>``."""

import json
from pathlib import Path
from typing import Any


def emit_json_line(result: dict[str, Any], path: Path | None) -> None:
    """Print ``result`` as one JSON line; also write it to ``path`` when given."""
    line = json.dumps(result)
    print(line)
    if path is not None:
        path.write_text(line + "\n")
