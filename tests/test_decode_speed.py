"""benchmarks.decode_speed, the source of every tok/s and roofline figure, run end to end on tiny bundles:
one worker subprocess per (round, bundle), the rounds interleaved, the JSON it writes and its arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import decode_speed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def speed(bundles, tmp_path_factory):  # type: ignore[no-untyped-def]
    dense = bundles.dense("llama")
    out = tmp_path_factory.mktemp("speed") / "decode_speed.json"
    contexts = [16, 32]
    cmd = [sys.executable, "-m", "benchmarks.decode_speed", str(dense), str(dense), "--contexts", *map(str, contexts),
           "--new-tokens", "3", "--runs", "2", "--rounds", "2", "--threads", "1", "--prefill-length", "16",
           "--bandwidth-gb", "0.02", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dense, contexts, json.loads(out.read_text()), proc.stdout


def test_decode_speed_writes_every_figure_for_every_bundle(speed) -> None:  # type: ignore[no-untyped-def]
    from qsvd_export.bundle import load_bundle_config

    dense, contexts, result, stdout = speed
    assert result["bandwidth_gb_s"] > 0 and len(result["rows"]) == 2
    config = load_bundle_config(dense)
    for row in result["rows"]:
        assert row["bundle"] == str(dense) and row["rounds"] == 2
        assert row["kv_bytes_per_token"] == config.kv_bytes_per_token()
        assert row["weight_bytes"] == (dense / "model.onnx.data").stat().st_size
        assert 0 < row["weight_bytes_read_per_token"] <= row["weight_bytes"] + (dense / "model.onnx").stat().st_size
        assert row["prefill_16_ms"] > 0 and row["peak_rss_mb"] > 0
        for context in contexts:
            rate = row[f"decode_{context}_tok_s"]
            assert rate > 0
            every_run = row[f"decode_{context}_tok_s_runs"]  # 2 timed runs × 2 rounds, the median among them
            assert len(every_run) == 4 and min(every_run) <= rate <= max(every_run)
            bound = result["bandwidth_gb_s"] * 1e9 / (row["weight_bytes_read_per_token"]
                                                      + context * row["kv_bytes_per_token"])
            assert row[f"roofline_{context}_tok_s"] == pytest.approx(bound, rel=1e-9)
            assert row[f"achieved_over_roofline_{context}"] == pytest.approx(rate / bound, rel=1e-9)
    first, second = result["rows"]
    assert first["ratios"]["decode_16_tok_s"] == 1.0  # the first bundle is the baseline
    assert second["ratios"]["decode_32_tok_s"] == pytest.approx(second["decode_32_tok_s"] / first["decode_32_tok_s"])
    assert f"[{min(first['decode_16_tok_s_runs']):.1f}–" in stdout
    assert "decode@16 tok/s" in stdout and f"{result['bandwidth_gb_s']:.1f} GB/s" in stdout


def test_decode_speed_interleaves_the_rounds(speed) -> None:  # type: ignore[no-untyped-def]
    """Round r of every bundle runs before round r + 1 of any: the workers' own start times say so."""
    _, _, result, _ = speed
    a, b = (row["started"] for row in result["rows"])
    assert len(a) == len(b) == 2
    assert a[0] < b[0] < a[1] < b[1], (a, b)


def test_weight_bytes_read_per_token_counts_one_row_of_a_gathered_table(tmp_path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [table, weight])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert decode_speed.weight_bytes_read_per_token(tmp_path / "m.onnx") == 4 * 4 + 4 * 16  # one row + all of w
