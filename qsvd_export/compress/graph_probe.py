"""Run an ONNX graph over calibration samples with some inner values exposed as outputs (CPU EP)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from qsvd_export.errors import UsageError
from qsvd_export.onnx_io import load_onnx
from qsvd_export.passes.find_attention import AttentionBlock
from qsvd_export.progress import bar
from qsvd_export.runtimes.feeds import sample_feed


def probe_values(graph_path: Path, names: list[str], blocks: list[AttentionBlock], samples: np.ndarray,
                 label: str) -> Iterator[list[np.ndarray]]:
    """For each sample (token ids [L], or an image [C, H, W] for a vision graph), the values ``names`` of one
    batch-1 run of the graph at ``graph_path`` with the caches of ``blocks`` empty. ``label`` names the
    progress bar and the one-line error when a sample does not fit the graph's inputs."""
    import onnxruntime as ort

    model = load_onnx(graph_path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    outputs = {o.name for o in model.graph.outputs}
    for name in dict.fromkeys(names):
        if name not in outputs:
            model.graph.outputs.append(values[name])
    with tempfile.TemporaryDirectory() as tmp:
        ir.save(model, Path(tmp) / "probe.onnx", external_data="probe.onnx.data")
        del model
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(Path(tmp) / "probe.onnx"), sess_options=so, providers=["CPUExecutionProvider"])
        caches = {c.past.name for block in blocks for c in (block.k_cache, block.v_cache) if c is not None}
        progress = bar(len(samples), label)
        for sample in samples:
            try:
                feed = sample_feed(session.get_inputs(), sample, caches)
            except ValueError as exc:
                raise UsageError(f"{label}: {exc}") from None
            yield session.run(names, feed)
            progress.update()
        progress.close()
