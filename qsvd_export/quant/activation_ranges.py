"""Clipped activation ranges for the npu target's low-bit tensors, from streamed histograms.

``mse`` is the default, by measurement (smollm2 w8a8 + H1, 32 × 128 wiki_eval: mse 1.015× dense, minmax
1.022×, percentile 1.438×: the 0.01% tails it cuts carry the model). ``minmax`` keeps onnxruntime's
calibrated [min, max]. ``percentile`` and ``mse`` run the float static graph
once more over the calibration feeds with the chosen tensors as extra outputs, keep one fixed-range
histogram per tensor (the range from a first min/max pass; nothing is stored per feed), and pick

- ``percentile``: the [PERCENTILE, 1 - PERCENTILE] quantiles of the values;
- ``mse``: the [lo, hi] (each end shrunk toward zero on a grid) that minimizes the histogram's expected
  squared error of uniform quantization at the tensor's bit width: Δ²/12 inside the range
  (Δ = (hi - lo) / (2^bits - 1)), the squared distance to the range outside it.

Only the tensors the preset quantizes below 16 bits are clipped (``a8``: the MatMuls reading the norm);
at 16 bits rounding error is negligible next to the outliers a clip would cut (the residual stream's
massive activations carry the model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

METHODS = ("minmax", "percentile", "mse")
BINS = 4096
PERCENTILE = 1e-4  # clip the lowest and highest 0.01% of values
_SHRINK = np.geomspace(0.01, 1.0, 49)  # candidate fractions of each end of the min/max range


def session_with_outputs(float_path: Path, tensors: list[str]):  # type: ignore[no-untyped-def]
    """A CPU session over ``float_path`` with ``tensors`` as outputs (the graph proto is rewritten beside
    the original so its external data is shared, not copied)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(float_path, load_external_data=False)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
    handle, name = tempfile.mkstemp(prefix=".ranges-", suffix=".onnx", dir=float_path.parent)
    try:
        with open(handle, "wb") as out:
            out.write(proto.SerializeToString())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
    finally:
        Path(name).unlink(missing_ok=True)


def _expected_error(counts: np.ndarray, centers: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Histogram-weighted squared quantization error for each candidate range (lo[i], hi[i])."""
    step = (hi - lo) / levels
    inside = (centers[None, :] >= lo[:, None]) & (centers[None, :] <= hi[:, None])
    clipped = np.where(centers[None, :] < lo[:, None], lo[:, None] - centers[None, :],
                       centers[None, :] - hi[:, None])
    error = np.where(inside, (step[:, None] ** 2) / 12.0, clipped ** 2)
    return error @ counts


def pick_range(counts: np.ndarray, edges: np.ndarray, bits: int, method: str) -> tuple[float, float]:
    """The range ``method`` picks from one histogram (``counts`` over ``edges``, the observed min/max)."""
    low, high = float(edges[0]), float(edges[-1])
    if method == "minmax" or counts.sum() == 0:
        return low, high
    if method == "percentile":
        cumulative = np.cumsum(counts) / counts.sum()
        lo = float(edges[np.searchsorted(cumulative, PERCENTILE)])
        hi = float(edges[min(np.searchsorted(cumulative, 1.0 - PERCENTILE) + 1, len(edges) - 1)])
        return min(lo, 0.0), max(hi, 0.0)
    centers = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)
    highs = max(high, 0.0) * _SHRINK
    best = (np.inf, low, high)
    for lo in min(low, 0.0) * _SHRINK:  # one row of candidates at a time: [len(_SHRINK), BINS] temporaries
        valid = highs > lo
        if not valid.any():
            continue
        errors = _expected_error(weights, centers, np.full(int(valid.sum()), lo), highs[valid], 2 ** bits - 1)
        i = int(np.argmin(errors))
        if errors[i] < best[0]:
            best = (float(errors[i]), float(lo), float(highs[valid][i]))
    return best[1], best[2]


def clipped_ranges(float_path: Path, feeds: list[dict[str, np.ndarray]], tensors: dict[str, int],
                   method: str) -> dict[str, tuple[float, float]]:
    """{tensor: (rmin, rmax)} for ``tensors`` ({name: bits}) of the graph at ``float_path`` over ``feeds``."""
    if method == "minmax" or not tensors:
        return {}
    names = sorted(tensors)
    session = session_with_outputs(float_path, names)
    low = {n: np.inf for n in names}
    high = {n: -np.inf for n in names}
    for feed in feeds:  # pass 1: the histogram ranges
        for name, value in zip(names, session.run(names, feed)):
            low[name], high[name] = min(low[name], float(value.min())), max(high[name], float(value.max()))
    counts = {n: np.zeros(BINS, dtype=np.int64) for n in names}
    for feed in feeds:  # pass 2: fixed-range histograms
        for name, value in zip(names, session.run(names, feed)):
            counts[name] += np.histogram(value, bins=BINS, range=(low[name], max(high[name], low[name] + 1e-12)))[0]
    ranges = {}
    for name in names:
        edges = np.linspace(low[name], max(high[name], low[name] + 1e-12), BINS + 1)
        ranges[name] = pick_range(counts[name], edges, tensors[name], method)
    return ranges
