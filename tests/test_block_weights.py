"""LPBQ blockwise int4 weights (the npu target's w4 presets): the code search and the graph rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsvd_export.quant.lpbq import CODE_LEVELS, lpbq_quantize, rewrite_as_lpbq
from qsvd_export.quant.weight_ranges import mse_channel_clips


def _weight(rng: np.random.Generator, k: int = 128, n: int = 6) -> np.ndarray:
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[:32, 1] *= 10.0  # one block of channel 1 much larger than its others
    weight[k // 2 + 6, n - 2] = 12.0  # one outlier weight
    return weight


def test_codes_are_4_bit_and_each_block_gets_the_best_code() -> None:
    rng = np.random.default_rng(0)
    weight = _weight(rng)
    rows = rng.uniform(0.1, 5.0, 128)
    lpbq = lpbq_quantize(weight, 32, rows)
    assert lpbq.values.min() >= -8 and lpbq.values.max() <= 7
    assert lpbq.codes.min() >= 1 and lpbq.codes.max() <= CODE_LEVELS and lpbq.codes.shape == (4, 6)
    scales = np.repeat(lpbq.codes.astype(np.float32), 32, axis=0) * lpbq.channel_scale
    assert np.array_equal(lpbq.dequantized(), lpbq.values * scales)
    for b in range(4):
        for n in range(6):
            block, r = weight[b * 32:(b + 1) * 32, n], rows[b * 32:(b + 1) * 32]
            errors = []
            for code in range(1, CODE_LEVELS + 1):
                s = np.float32(code) * lpbq.channel_scale[n]
                errors.append(float((r * (np.clip(np.rint(block / s), -8, 7) * s - block) ** 2).sum()))
            chosen = float((r * (lpbq.dequantized()[b * 32:(b + 1) * 32, n] - block) ** 2).sum())
            assert chosen == pytest.approx(min(errors), rel=1e-5)


def test_blocks_beat_the_best_per_channel_int4_clip() -> None:
    rng = np.random.default_rng(1)
    weight = _weight(rng)
    clips = mse_channel_clips(weight, 4)
    scale = (clips / 7).astype(np.float32)
    per_channel = np.clip(np.rint(weight / scale), -7, 7) * scale
    blocked = lpbq_quantize(weight, 32).dequantized()
    assert ((blocked - weight) ** 2).sum() < 0.7 * ((per_channel - weight) ** 2).sum()


def test_k_must_be_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        lpbq_quantize(np.ones((40, 2), np.float32), 32)


def _per_channel_int4_matmul(weight: np.ndarray, path) -> None:  # type: ignore[no-untyped-def]
    """x [1, 3, K] → (uint16 QDQ) → MatMul with a per-channel int4 DequantizeLinear weight, as the QNN recipe
    writes it."""
    k, n = weight.shape
    scale = (np.abs(weight).max(axis=0) / 7).astype(np.float32)
    values = np.clip(np.rint(weight / scale), -8, 7).astype(np.int8)
    inits = [helper.make_tensor("w_quantized", TensorProto.INT4, [k, n], values.flatten().tolist()),
             numpy_helper.from_array(scale, "w_scale"),
             helper.make_tensor("w_zero_point", TensorProto.INT4, [n], [0] * n),
             numpy_helper.from_array(np.array(1 / 4000, np.float32), "xs"),
             numpy_helper.from_array(np.array(32768, np.uint16), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xd"),
             helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["wd"], axis=1, name="wd"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)


def test_rewrite_puts_lpbq_weights_in_the_graph_and_the_cpu_ep_runs_them(tmp_path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    weight = _weight(rng, k=64, n=5)
    _per_channel_int4_matmul(weight, tmp_path / "qdq.onnx")
    counts = rewrite_as_lpbq(tmp_path / "qdq.onnx", tmp_path / "lpbq.onnx", {"proj": weight}, 32, {})
    assert counts == {"lpbq_matmuls": 1, "per_channel_int4_matmuls": 0}
    proto = onnx.load(tmp_path / "lpbq.onnx")
    onnx.checker.check_model(proto)
    dq = next(n for n in proto.graph.node if n.name == "wd")
    attributes = {a.name: a.i for a in dq.attribute}
    assert attributes == {"axis": 0, "block_size": 32}
    scales = next(n for n in proto.graph.node if n.output[0] == dq.input[1])
    assert scales.op_type == "DequantizeLinear"
    names = {i.name for i in proto.graph.initializer}
    assert "w_scale" not in names and "w_zero_point" not in names  # the per-channel scale is gone
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "lpbq.onnx"), providers=["CPUExecutionProvider"])
    expected = np.clip(np.rint(x * 4000), -32768, 32767) / 4000 @ lpbq_quantize(weight, 32).dequantized()
    assert np.abs(session.run(None, {"x": x})[0] - expected).max() < 1e-4


def test_a_weight_whose_rows_do_not_fill_blocks_stays_per_channel(tmp_path) -> None:
    weight = _weight(np.random.default_rng(3), k=48, n=4)
    _per_channel_int4_matmul(weight, tmp_path / "qdq.onnx")
    counts = rewrite_as_lpbq(tmp_path / "qdq.onnx", tmp_path / "lpbq.onnx", {"proj": weight}, 32, {})
    assert counts == {"lpbq_matmuls": 0, "per_channel_int4_matmuls": 1}
