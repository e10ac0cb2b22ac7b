"""8- or 4-bit latent cache I/O for the cpu target (``--kv-bits 8|4`` on a bundle whose layers cache a QSVD latent).

Calibration runs the bundle's float graph in ONNX Runtime on ``calib_windows`` × 512 tokens of calibration text
(prefill with an empty cache) and reads what the graph writes into ``present.i.latent``. 8-bit: per latent channel
scale = max|latent| / 127. 4-bit: scale = a · max|latent| / 7 with the clip fraction a per channel that minimizes
the squared error of the saturated codes over the calibration tokens (:func:`mse_scales`). The graph is then
rewritten by :class:`~qsvd_export.passes.quantize_latent_cache.QuantizeLatentCachePass`, and ``qsvd_config.json``
lists each latent tensor as ``uint8`` with its ``quantization`` ``{"axis": 2, "scale": [r floats], "zero_point":
128}`` (4-bit: ``"zero_point": 8, "bits": 4`` and a ``"packing"`` note; the tensor's last dimension is ⌈r/2⌉ bytes).
The scales live in the graph too; runtimes pass the codes back unchanged. Inside the graph the cache is read as
codes with the scales folded into its readers (:mod:`~qsvd_export.passes.fold_latent_scales`), and the
attention-weighted latent is one integer product on the codes (:mod:`~qsvd_export.passes.integer_value_product`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qsvd_export.bundle import CONFIG_NAME, GRAPH_FILE, BundleConfig, CacheTensor
from qsvd_export.errors import UsageError

CODE_MAX = 127
CODE_MAX_4 = 7
PACKING = "byte j holds channel j in its low nibble and channel j + ceil(r/2) in its high nibble"


def latent_tensor_names(config: BundleConfig) -> list[str]:
    """The float latent cache inputs of a bundle (``past_key_values.i.latent``)."""
    return [t.input for layer in config.cache if layer.kind == "latent" for t in layer.tensors
            if t.input.endswith(".latent") and t.dtype == "float32"]


def latent_cache_bits_for(request: Any, config: BundleConfig) -> int | None:
    """The latent cache bits a :class:`~qsvd_export.build.request.TargetRequest` asks of this bundle: 8, 4, or None
    (float). "auto" is 8 where the bundle caches a float latent on target cpu."""
    bits = request.latent_cache_bits if request is not None else None
    if bits == "auto":
        return 8 if request.target == "cpu" and latent_tensor_names(config) else None
    return bits


def _written_latents(folder: Path, windows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """Per window of ``windows`` [n, length] the cache a prefill with an empty cache writes (the bundle in
    ``folder``, CPU EP), keyed by cache input name."""
    from qsvd_export.runtimes.decode import DecoderRunner

    runner = DecoderRunner(folder)
    for window in windows:
        yield runner.prefill(np.asarray(window, dtype=np.int64)[None, :])[1]


def latent_peaks(folder: Path, names: list[str], windows: np.ndarray) -> dict[str, np.ndarray]:
    """Per latent cache input the largest |value| per channel [r] over prefills of ``windows`` [n, length]
    through the bundle in ``folder`` (CPU EP)."""
    largest: dict[str, np.ndarray] = {}
    for cache in _written_latents(folder, windows):
        for name in names:
            peak = np.abs(cache[name]).max(axis=(0, 1))
            largest[name] = peak if name not in largest else np.maximum(largest[name], peak)
    return largest


def latent_samples(folder: Path, names: list[str], windows: np.ndarray, skip: int = 0) -> dict[str, np.ndarray]:
    """Per latent cache input every value the graph writes [tokens, r] (float32) over prefills of ``windows``, the
    first ``skip`` positions of each window left out."""
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for cache in _written_latents(folder, windows):
        for name in names:
            found[name].append(np.asarray(cache[name][:, skip:], np.float32).reshape(-1, cache[name].shape[-1]))
    return {name: np.concatenate(parts) for name, parts in found.items()}


def mse_scales(samples: dict[str, np.ndarray], levels: int,
               clips: np.ndarray = np.linspace(0.25, 1.0, 16)) -> dict[str, np.ndarray]:
    """Symmetric scales for codes saturating at ±``levels``: per channel a · peak / levels with a in ``clips`` that
    minimizes the mean squared error of the dequantized codes over ``samples`` [tokens, r]."""
    tiny = np.finfo(np.float32).tiny
    scales = {}
    for name, values in samples.items():
        peak = np.maximum(np.abs(values).max(axis=0), tiny)
        errors = []
        for clip in clips:
            scale = peak * clip / levels
            codes = np.clip(np.rint(values / scale), -levels, levels)
            errors.append(np.square(codes * scale - values).mean(axis=0))
        best = np.asarray(clips)[np.argmin(np.stack(errors), axis=0)]
        scales[name] = np.maximum(peak * best / levels, tiny).astype(np.float32)
    return scales


def scales_for(peaks: dict[str, np.ndarray], levels: int = CODE_MAX,
               clip: float = 1.0) -> dict[str, np.ndarray]:
    """Symmetric scales putting ``clip`` · peak on code ``levels`` (int8: 127), float32, never zero."""
    tiny = np.finfo(np.float32).tiny
    return {name: (np.maximum(peak * clip, tiny) / levels).astype(np.float32) for name, peak in peaks.items()}


def quantize_latent_cache(folder: Path, config: BundleConfig, tokenizer: Any, calib_windows: int = 32,
                          calib_text: str = "wiki_calib", scales: dict[str, np.ndarray] | None = None,
                          bits: int = 8, levels: int = CODE_MAX) -> dict[str, Any]:
    """Rewrite ``folder``'s ``model.onnx`` so that every latent cache crosses the graph boundary as ``bits`` (8 or 4)
    bit codes, and ``config`` (written back to ``qsvd_config.json``) to match. Returns the report entry. ``scales``:
    given per latent input (probes of other code ranges), instead of calibrated; ``levels`` (8-bit probes): codes
    saturate at ±levels."""
    from qsvd_export.build.files import save_graph
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.fold_latent_scales import FoldLatentScalesPass
    from qsvd_export.passes.integer_value_product import IntegerValueProductPass, weighted_latents
    from qsvd_export.passes.latent_sink import KeepLatentSinkPass
    from qsvd_export.passes.quantize_latent_cache import ZERO_POINT, ZERO_POINT_4, QuantizeLatentCachePass
    from qsvd_export.progress import info

    names = latent_tensor_names(config)
    if not names:
        raise UsageError(f"--kv-bits {bits} on target cpu quantizes a latent KV cache, and this graph has none "
                         "(a dense cache: use export --target cpu --kv-bits 8, which fuses attention)")
    if scales is None:
        if tokenizer is None:
            raise UsageError(f"--kv-bits {bits} calibrates the latent cache on text, and this graph has no tokenizer "
                             "(give --tokenizer HF_DIR)")
        info(f"latent cache: {bits}-bit codes with static per-channel scales, calibrated on {calib_windows} x 512 "
             "tokens")
        windows = token_windows(tokenizer, read_text(calib_text), 512, calib_windows, source=calib_text)
        scales = scales_for(latent_peaks(folder, names, windows)) if bits == 8 \
            else mse_scales(latent_samples(folder, names, windows, skip=1), CODE_MAX_4)  # the first token: exact
    import onnx_ir as ir

    model = ir.load(folder / GRAPH_FILE)  # the bundle's own graph: no input checks or clean-ups
    sink = [KeepLatentSinkPass(list(scales))] if bits == 4 else []
    run_passes(model, [QuantizeLatentCachePass(scales, bits, levels), FoldLatentScalesPass(), *sink])
    integer_products = len(weighted_latents(model.graph))
    if integer_products:  # a graph whose probabilities are no Softmax keeps the float product
        run_passes(model, [IntegerValueProductPass()])
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the loaded graph reads the data file it replaces
        save_graph(model, Path(tmp))
        del model
        for name in (GRAPH_FILE, f"{GRAPH_FILE}.data"):
            shutil.move(str(Path(tmp) / name), folder / name)
    config.cache = [replace(layer, tensors=[
        coded for t in layer.tensors for coded in (_coded(t, scales[t.input], bits) if t.input in scales else [t])])
        for layer in config.cache]
    (folder / CONFIG_NAME).write_text(config.to_json())
    layout = (f"uint8 codes, zero point {ZERO_POINT}, static symmetric scale per latent channel (axis 2)" if bits == 8
              else f"4-bit codes in [1, 15], zero point {ZERO_POINT_4}, two per byte ({PACKING}), static symmetric "
                   "scale per latent channel; the first token's latent also kept exact in float32 "
                   "(past_key_values.i.latent_sink, the attention sink)")
    calibration = (f"max |latent| over {calib_windows} x 512 tokens of {calib_text}" if bits == 8 else
                   f"per-channel clip of max |latent| minimizing the squared error over {calib_windows} x 512 tokens "
                   f"of {calib_text} (the first token of each window left out)")
    return {"bits": bits, "layout": layout,
            "decode": "keys rebuilt by MatMulIntegerToFloat on the codes (scales folded into its int8 weight); the "
                      + ("attention-weighted latent by one MatMulIntegerToFloat on the codes, the probabilities on two "
                         "uint8 grids (1/255 and 1/65025 of each row's maximum), scaled after the product (no float "
                         "copy of the cache)" if integer_products else
                         "attention-weighted latent scaled after the product (no per-step dequantize of the cache)"),
            "integer_value_products": integer_products,
            "calibration": calibration,
            "tensors": len(scales), "kv_bytes_per_token": config.kv_bytes_per_token(),
            "static_scale_bytes": 4 * sum(len(s) for s in scales.values()),
            **({"sink_bytes": config.kv_fixed_bytes()} if bits == 4 else {})}


def _coded(tensor: CacheTensor, scale: np.ndarray, bits: int) -> list[CacheTensor]:
    """The config entries of a latent cache tensor stored as ``bits``-bit codes with per-channel ``scale`` [r]
    (4-bit: and its exact first token, :mod:`~qsvd_export.passes.latent_sink`)."""
    from qsvd_export.passes.latent_sink import sink_name
    from qsvd_export.passes.quantize_latent_cache import ZERO_POINT, ZERO_POINT_4

    quantization: dict[str, Any] = {"axis": 2, "scale": [float(s) for s in scale],
                                    "zero_point": ZERO_POINT if bits == 8 else ZERO_POINT_4}
    if bits == 8:
        return [replace(tensor, dtype="uint8", quantization=quantization)]
    shape = [*tensor.shape[:-1], (len(scale) + 1) // 2]
    return [replace(tensor, dtype="uint8", shape=shape, quantization={**quantization, "bits": 4, "packing": PACKING}),
            replace(tensor, input=sink_name(tensor.input), output=sink_name(tensor.output), max_length=1)]
