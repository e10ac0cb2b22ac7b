"""8-bit latent cache I/O for the cpu target (``--kv-bits 8`` on a bundle whose layers cache a QSVD latent).

Calibration runs the bundle's float graph in ONNX Runtime on ``calib_windows`` × 512 tokens of calibration text
(prefill with an empty cache) and takes, per latent channel, the largest magnitude the graph writes into
``present.i.latent``: scale = max|latent| / 127 (symmetric, zero point 0). The graph is then rewritten by
:class:`~qsvd_export.passes.quantize_latent_cache.QuantizeLatentCachePass`, and ``qsvd_config.json`` lists each
latent tensor as ``uint8`` with its ``quantization`` ``{"axis": 2, "scale": [r floats], "zero_point": 128}``
(the scales live in the graph too; runtimes pass the codes back unchanged). Inside the graph the cache is read as
``Cast(codes)`` with the scales folded into its readers (:mod:`~qsvd_export.passes.fold_latent_scales`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import CONFIG_NAME, GRAPH_FILE, BundleConfig
from qsvd_export.errors import UsageError

CODE_MAX = 127


def latent_tensor_names(config: BundleConfig) -> list[str]:
    """The float latent cache inputs of a bundle (``past_key_values.i.latent``)."""
    return [t.input for layer in config.cache if layer.kind == "latent" for t in layer.tensors
            if t.input.endswith(".latent") and t.dtype == "float32"]


def latent_cache_bits_for(request: Any, config: BundleConfig) -> int | None:
    """The latent cache bits a :class:`~qsvd_export.build.request.TargetRequest` asks of this bundle: 8, or None
    (float). "auto" is 8 where the bundle caches a float latent on target cpu."""
    bits = request.latent_cache_bits if request is not None else None
    if bits == "auto":
        return 8 if request.target == "cpu" and latent_tensor_names(config) else None
    return bits


def latent_peaks(folder: Path, names: list[str], windows: np.ndarray) -> dict[str, np.ndarray]:
    """Per latent cache input the largest |value| per channel [r] over prefills of ``windows`` [n, length]
    through the bundle in ``folder`` (CPU EP)."""
    from qsvd_export.runtimes.decode import DecoderRunner

    runner = DecoderRunner(folder)
    largest: dict[str, np.ndarray] = {}
    for window in windows:
        _, cache = runner.prefill(np.asarray(window, dtype=np.int64)[None, :])
        for name in names:
            peak = np.abs(cache[name]).max(axis=(0, 1))
            largest[name] = peak if name not in largest else np.maximum(largest[name], peak)
    return largest


def scales_for(peaks: dict[str, np.ndarray], levels: int = CODE_MAX,
               clip: float = 1.0) -> dict[str, np.ndarray]:
    """Symmetric scales putting ``clip`` · peak on code ``levels`` (int8: 127), float32, never zero."""
    tiny = np.finfo(np.float32).tiny
    return {name: (np.maximum(peak * clip, tiny) / levels).astype(np.float32) for name, peak in peaks.items()}


def quantize_latent_cache(folder: Path, config: BundleConfig, tokenizer: Any, calib_windows: int = 32,
                          calib_text: str = "wiki_calib",
                          scales: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Rewrite ``folder``'s ``model.onnx`` so that every latent cache crosses the graph boundary as 8-bit codes, and
    ``config`` (written back to ``qsvd_config.json``) to match. Returns the report entry. ``scales``: given per
    latent input (probes of other code ranges), instead of calibrated."""
    from qsvd_export.build.files import save_graph
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.fold_latent_scales import FoldLatentScalesPass
    from qsvd_export.passes.quantize_latent_cache import ZERO_POINT, QuantizeLatentCachePass
    from qsvd_export.progress import info

    names = latent_tensor_names(config)
    if not names:
        raise UsageError("--kv-bits 8 on target cpu quantizes a latent KV cache, and this graph has none "
                         "(a dense cache: use export --target cpu --kv-bits 8, which fuses attention)")
    if scales is None:
        if tokenizer is None:
            raise UsageError("--kv-bits 8 calibrates the latent cache on text, and this graph has no tokenizer "
                             "(give --tokenizer HF_DIR)")
        info(f"latent cache: 8-bit codes with static per-channel scales, calibrated on {calib_windows} x 512 tokens")
        windows = token_windows(tokenizer, read_text(calib_text), 512, calib_windows, source=calib_text)
        scales = scales_for(latent_peaks(folder, names, windows))
    import onnx_ir as ir

    model = ir.load(folder / GRAPH_FILE)  # the bundle's own graph: no input checks or clean-ups
    run_passes(model, [QuantizeLatentCachePass(scales), FoldLatentScalesPass()])
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the loaded graph reads the data file it replaces
        save_graph(model, Path(tmp))
        del model
        for name in (GRAPH_FILE, f"{GRAPH_FILE}.data"):
            shutil.move(str(Path(tmp) / name), folder / name)
    config.cache = [replace(layer, tensors=[
        replace(t, dtype="uint8", quantization={"axis": 2, "scale": [float(s) for s in scales[t.input]],
                                                "zero_point": ZERO_POINT}) if t.input in scales else t
        for t in layer.tensors]) for layer in config.cache]
    (folder / CONFIG_NAME).write_text(config.to_json())
    return {"bits": 8, "layout": f"uint8 codes, zero point {ZERO_POINT}, static symmetric scale per latent channel "
                                 "(axis 2)",
            "decode": "keys rebuilt by MatMulIntegerToFloat on the codes (scales folded into its int8 weight); the "
                      "attention-weighted latent scaled after the product (no per-step dequantize of the cache)",
            "calibration": f"max |latent| over {calib_windows} x 512 tokens of {calib_text}",
            "tensors": len(scales), "kv_bytes_per_token": config.kv_bytes_per_token(),
            "static_scale_bytes": 4 * sum(len(s) for s in scales.values())}
