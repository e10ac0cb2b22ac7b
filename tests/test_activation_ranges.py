"""Activation range methods of the npu target: min/max, percentile and MSE clipping from histograms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qsvd_export.quant.activation_ranges import BINS, _expected_error, pick_range
from qsvd_export.cli import main

from test_npu import SMALL


def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.histogram(values, bins=BINS, range=(float(values.min()), float(values.max())))


def _error(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float, bits: int) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    return float(_expected_error(counts.astype(np.float64), centers, np.asarray([lo]), np.asarray([hi]), 2**bits - 1)[0])


@pytest.fixture(scope="module")
def heavy_tailed() -> np.ndarray:
    return np.random.default_rng(0).laplace(0.0, 1.0, 200_000)


def test_minmax_keeps_the_observed_range(heavy_tailed: np.ndarray) -> None:
    counts, edges = _histogram(heavy_tailed)
    assert pick_range(counts, edges, 8, "minmax") == (float(edges[0]), float(edges[-1]))


@pytest.mark.parametrize("bits, optimum", [(8, 9.89), (4, 5.03)])
def test_mse_clips_a_laplace_tail_where_the_analytic_optimum_is(heavy_tailed: np.ndarray, bits: int,
                                                                 optimum: float) -> None:
    # ACIQ (Banner et al. 2019): the MSE-optimal clip of Laplace(0, b) is 9.89 b at 8 bits, 5.03 b at 4 bits;
    # the observed max here is ~13 b
    counts, edges = _histogram(heavy_tailed)
    lo, hi = pick_range(counts, edges, bits, "mse")
    assert abs(hi - optimum) < 0.05 * optimum + 0.3 and abs(-lo - optimum) < 0.05 * optimum + 0.3
    assert _error(counts, edges, lo, hi, bits) < _error(counts, edges, float(edges[0]), float(edges[-1]), bits)


def test_mse_keeps_a_few_far_outliers_that_clipping_would_cost_more() -> None:
    values = np.concatenate([np.random.default_rng(2).standard_normal(200_000), [40.0, -35.0, 60.0]])
    counts, edges = _histogram(values)
    lo, hi = pick_range(counts, edges, 8, "mse")
    assert _error(counts, edges, lo, hi, 8) <= _error(counts, edges, float(edges[0]), float(edges[-1]), 8)
    assert hi > 0.6 * edges[-1]


def test_mse_keeps_a_uniform_range_and_16_bits_keep_the_outliers(heavy_tailed: np.ndarray) -> None:
    uniform = np.random.default_rng(1).uniform(-2.0, 3.0, 100_000)
    counts, edges = _histogram(uniform)
    lo, hi = pick_range(counts, edges, 8, "mse")
    assert lo <= 0.95 * edges[0] and hi >= 0.95 * edges[-1]
    counts, edges = _histogram(heavy_tailed)
    assert pick_range(counts, edges, 16, "mse")[1] > pick_range(counts, edges, 8, "mse")[1]  # finer steps: cut less


def test_percentile_drops_the_extreme_tail(heavy_tailed: np.ndarray) -> None:
    counts, edges = _histogram(heavy_tailed)
    lo, hi = pick_range(counts, edges, 8, "percentile")
    inside = np.mean((heavy_tailed >= lo) & (heavy_tailed <= hi))
    assert lo > edges[0] and hi < edges[-1] and 1 - 4e-4 < inside < 1.0


def _scales(folder) -> dict[str, tuple[int, float]]:  # type: ignore[no-untyped-def]
    proto = onnx.load(folder / "prefill.onnx", load_external_data=False)
    inits = {i.name: onnx.numpy_helper.to_array(i) if i.data_location != onnx.TensorProto.EXTERNAL else None
             for i in proto.graph.initializer}
    types = {i.name: i.data_type for i in proto.graph.initializer}
    return {n.input[0]: (types[n.input[2]], float(inits[n.input[1]])) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and inits.get(n.input[1]) is not None and inits[n.input[1]].size == 1}


def test_a_clipping_method_narrows_only_the_8_bit_activations(tmp_path, bundles, capsys) -> None:  # type: ignore[no-untyped-def]
    # percentile: on the tiny model's few thousand near-Gaussian values per tensor the MSE optimum is the
    # observed range (the unit tests above pin MSE); the 0.01% tails of the larger tensors are clipped
    graph = str(bundles.dense("llama") / "model.onnx")
    scales = {}
    for method in ("minmax", "percentile"):
        out = tmp_path / method
        code = main([graph, "--target", "npu", "--bits", "w8a8", *SMALL, "--calibration-method", method,
                     "--no-verify", "-o", str(out), "-q"])
        assert code == 0, capsys.readouterr().err
        scales[method] = _scales(out)
    assert scales["minmax"].keys() == scales["percentile"].keys()
    eight = [t for t, (dtype, _) in scales["minmax"].items() if dtype == onnx.TensorProto.UINT8]
    others = [t for t in scales["minmax"] if t not in eight]
    assert eight and all(scales["percentile"][t][1] <= scales["minmax"][t][1] * (1 + 1e-6) for t in eight)
    assert any(scales["percentile"][t][1] < 0.99 * scales["minmax"][t][1] for t in eight)
    assert all(scales["percentile"][t] == scales["minmax"][t] for t in others)
