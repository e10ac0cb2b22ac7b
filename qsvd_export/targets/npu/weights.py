"""One page-aligned weights file shared by the prefill and decode graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsvd_export.targets.npu.options import GRAPH_FILES

SHARED_DATA = "weights.data"


def save_sharing_weights(sources: dict[str, Path], folder: Path, data_name: str = SHARED_DATA) -> dict[str, Any]:
    """Write each graph in ``sources`` to ``folder/<role>.onnx`` with all initializers of 1 KiB or more in
    one ``data_name`` file; an initializer both graphs hold with the same name and bytes (the quantized
    weights: their scales come from the weights alone) is stored once. Returns byte counts."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    stored: dict[tuple[str, str], tuple[int, int]] = {}
    written = shared = 0
    with open(folder / data_name, "wb") as data:
        for role, source in sources.items():
            proto = onnx.load(source, load_external_data=True)
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < 1024:
                    continue
                key = (tensor.name, hashlib.sha256(raw).hexdigest())
                if key in stored:
                    shared += len(raw)
                else:
                    pad = -data.tell() % 4096  # page-aligned, so runtimes can memory-map tensors
                    data.write(b"\0" * pad)
                    stored[key] = (data.tell(), len(raw))
                    data.write(raw)
                    written += len(raw)
                offset, length = stored[key]
                set_external_data(tensor, data_name, offset, length)
                tensor.ClearField("raw_data")
            onnx.save(proto, folder / GRAPH_FILES[role])
            del proto
    return {"weight_file": data_name, "bytes_written": written, "bytes_shared": shared}

