"""Float static prefill/decode graphs and the calibration feeds made by running them on text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qsvd_export.bundle import LayerCache
from qsvd_export.targets.npu.options import NpuOptions


def static_float_graphs(dynamic_path: Path, work: Path, options: NpuOptions) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write ``prefill`` and ``decode`` float static graphs into ``work``; returns paths and what was done."""
    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.low_precision import FuseNormsAndClampMasksPass
    from qsvd_export.passes.rotary_tables import TabulateRotaryPass
    from qsvd_export.passes.static_shapes import SpecializeDecoderPass
    from qsvd_export.passes.untie_embedding import UntieEmbeddingPass

    paths, report = {}, {}
    for role, seq in (("prefill", options.prefill_length), ("decode", 1)):
        model = ir.load(dynamic_path)
        norms, rotary = FuseNormsAndClampMasksPass(options.mask_value), TabulateRotaryPass(options.context_length)
        untie = UntieEmbeddingPass()
        run_passes(model, [SpecializeDecoderPass(seq, options.context_length), norms, rotary, untie])
        report[role] = {**norms.report.as_dict(), **rotary.report, **({"untied_embeddings": untie.untied}
                                                                       if untie.untied else {})}
        paths[role] = work / f"{role}_float.onnx"
        ir.save(model, paths[role], external_data=f"{role}_float.onnx.data")
        del model
    return paths, report


def calibration_feeds(float_paths: dict[str, Path], cache: list[LayerCache], windows: np.ndarray,
                      options: NpuOptions) -> dict[str, list[dict[str, np.ndarray]]]:
    """Graph inputs for calibration: per window of 2·prefill + decode_steps tokens, two prefill feeds
    (empty cache, then the cache the float graphs built) and ``decode_steps`` decode feeds."""
    from qsvd_export.runtimes.static_decode import StaticDecoder

    decoder = StaticDecoder.from_files(float_paths["prefill"], float_paths["decode"], cache,
                                       options.context_length, options.prefill_length)
    from qsvd_export.progress import bar

    size = options.prefill_length
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"prefill": [], "decode": []}
    progress = bar(len(windows), "npu calibration feeds (float static graphs)")
    for row in windows:
        tokens = [int(t) for t in row]
        state = decoder.empty_state()
        for role, chunk in [("prefill", tokens[:size]), ("prefill", tokens[size:2 * size]),
                            *(("decode", [t]) for t in tokens[2 * size:2 * size + options.calibration_decode_steps])]:
            _, state, feed = decoder.step_with_feed(state, chunk)
            feeds[role].append(feed)
        progress.update()
    progress.close()
    return feeds


def calibration_windows(tokenizer: Any, options: NpuOptions) -> np.ndarray:
    """``calibration_windows`` rows of wiki_calib tokens, each long enough for :func:`calibration_feeds`."""
    from qsvd_export.data import read_text, token_windows

    span = 2 * options.prefill_length + options.calibration_decode_steps
    return token_windows(tokenizer, read_text("wiki_calib"), span, options.calibration_windows, source="wiki_calib")


class FeedReader:
    """onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

