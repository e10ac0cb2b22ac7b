"""MSE clip search of per-channel symmetric weight ranges (npu int8 / int4 weights)."""

from __future__ import annotations

import numpy as np
import pytest

from qsvd_export.quant.weight_ranges import FRACTIONS, mse_channel_clips


def _error(column: np.ndarray, clip: float, bits: int, rows: np.ndarray | None = None) -> float:
    qmax = 2 ** (bits - 1) - 1
    scale = np.float32(clip / qmax)
    squared = (np.clip(np.rint(column / scale), -qmax, qmax) * scale - column) ** 2
    return float((squared * (1.0 if rows is None else rows)).sum())


@pytest.mark.parametrize("bits", [4, 8])
def test_each_channel_gets_the_best_clip_of_the_grid(bits: int) -> None:
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((96, 7)).astype(np.float32)
    weight[3, 2] = 9.0  # one outlier weight
    clips = mse_channel_clips(weight, bits, chunk=96 * 3)  # several column chunks
    for n in range(weight.shape[1]):
        column = weight[:, n]
        errors = [_error(column, f * np.abs(column).max(), bits) for f in FRACTIONS]
        assert _error(column, clips[n], bits) == pytest.approx(min(errors), rel=1e-6)
        assert _error(column, clips[n], bits) <= _error(column, np.abs(column).max(), bits)


def test_int4_clips_an_outlier_channel_and_int8_keeps_more_of_it() -> None:
    column = np.random.default_rng(0).standard_normal((512, 1)).astype(np.float32)
    column[0, 0] = 6.0
    clip4, clip8 = mse_channel_clips(column, 4)[0], mse_channel_clips(column, 8)[0]
    assert clip4 < 0.9 * 6.0 and clip8 >= clip4


def test_row_weights_keep_the_weights_that_meet_large_activations() -> None:
    rng = np.random.default_rng(3)
    column = rng.standard_normal((256, 1)).astype(np.float32)
    column[5, 0] = 6.0  # a large weight on an input channel with massive activations
    rows = np.ones(256)
    rows[5] = 1e4
    plain, weighted = mse_channel_clips(column, 4)[0], mse_channel_clips(column, 4, rows)[0]
    assert plain < 0.9 * 6.0 and weighted > plain
    errors = [_error(column[:, 0], f * 6.0, 4, rows) for f in FRACTIONS]
    assert _error(column[:, 0], weighted, 4, rows) == pytest.approx(min(errors), rel=1e-6)
