"""Target stage: blockwise weight quantization, MatMulNBits packing, the cpu policy end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qsvd_export.quant.matmul_nbits import RANGE_GRID, quantize_blockwise
from qsvd_export.cli import main
from qsvd_export.passes.quantize_weights import QuantizeWeightsPass
from qsvd_export.runtimes.decode import DecoderRunner

RNG = np.random.default_rng(0)


def _matmul_model(weight: np.ndarray, transposed: bool) -> ir.Model:
    """y = x · W with W stored as [K, N], or as Transpose([N, K]) like a tied lm_head."""
    k, n = weight.shape
    x = ir.Value(name="x", shape=ir.Shape([2, k]), type=ir.TensorType(ir.DataType.FLOAT))
    stored = weight.T.copy() if transposed else weight
    w = ir.Value(name="w", shape=ir.Shape(stored.shape), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(stored, name="w"))
    nodes = []
    b = w
    if transposed:
        nodes.append(ir.Node("", "Transpose", [w], attributes=[ir.AttrInt64s("perm", [1, 0])], name="t"))
        b = nodes[-1].outputs[0]
    nodes.append(ir.Node("", "MatMul", [x, b], name="mm"))
    y = nodes[-1].outputs[0]
    y.name, y.shape, y.dtype = "y", ir.Shape([2, n]), ir.DataType.FLOAT
    graph = ir.Graph([x], [y], nodes=nodes, initializers=[w], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_matmulnbits_computes_exactly_the_dequantized_weight(bits, symmetric, transposed):
    weight = RNG.standard_normal((80, 48)).astype(np.float32)  # K = 80: the last block of 32 is padded
    weight[3, 5] = 9.0
    model = _matmul_model(weight, transposed)
    quantizer = QuantizeWeightsPass(bits, 32, accuracy_level=1, symmetric=symmetric)
    quantizer(model)
    assert [n.op_type for n in model.graph] == ["MatMulNBits"] or transposed  # the Transpose is left dead
    assert model.graph.outputs[0].name == "y"
    assert quantizer.report.quantized == ["mm"]
    x = RNG.standard_normal((2, 80)).astype(np.float32)
    dequantized = quantize_blockwise(weight, bits, 32, symmetric=symmetric).dequantize()
    np.testing.assert_allclose(_run(model, x), x @ dequantized, rtol=1e-5, atol=1e-5)
    # and the quantization is close to the float weight: error well under one step of the block range
    step = (weight.max() - weight.min()) / (2**bits - 1)
    assert np.abs(dequantized - weight).max() <= step


def _gather_model(table: np.ndarray, extra_reader: bool) -> ir.Model:
    """rows = Gather(table, ids); with ``extra_reader`` the table also feeds a MatMul (an unquantized tied head)."""
    ids = ir.Value(name="ids", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64))
    t = ir.Value(name="table", shape=ir.Shape(table.shape), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(table, name="table"))
    nodes = [ir.Node("", "Gather", [t, ids], attributes=[ir.AttrInt64("axis", 0)], name="embed")]
    rows = nodes[-1].outputs[0]
    rows.name, rows.shape, rows.dtype = "rows", ir.Shape([3, table.shape[1]]), ir.DataType.FLOAT
    outputs = [rows]
    if extra_reader:
        nodes.append(ir.Node("", "MatMul", [rows, t], name="head"))
        outputs.append(nodes[-1].outputs[0])
        outputs[-1].name, outputs[-1].dtype = "head", ir.DataType.FLOAT
    graph = ir.Graph([ids], outputs, nodes=nodes, initializers=[t], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_embedding_table_becomes_8_bit_gather_block_quantized():
    from qsvd_export.passes.quantize_embedding import QuantizeEmbeddingPass

    table = RNG.standard_normal((50, 80)).astype(np.float32)  # 80 = 2.5 blocks of 32: a short last block
    model = _gather_model(table, extra_reader=False)
    quantizer = QuantizeEmbeddingPass(32)
    quantizer(model)
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized"] and "table" not in model.graph.initializers
    assert quantizer.report.packed_bytes < table.nbytes / 3
    ids = np.asarray([0, 17, 49])
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"ids": ids})[0]
    expected = quantize_blockwise(table.T, 8, 32, symmetric=True).dequantize().T[ids]
    np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-6)  # exactly the op's documented dequantization
    assert np.abs(rows - table[ids]).max() <= np.abs(table).max() / 127


def test_a_table_with_other_readers_stays_float():
    from qsvd_export.passes.quantize_embedding import QuantizeEmbeddingPass

    model = _gather_model(RNG.standard_normal((40, 40)).astype(np.float32), extra_reader=True)
    quantizer = QuantizeEmbeddingPass(32)
    quantizer(model)
    assert [n.op_type for n in model.graph] == ["Gather", "MatMul"] and quantizer.report.quantized == []


def test_range_search_never_does_worse_than_min_max():
    weight = RNG.standard_t(3, (256, 64)).astype(np.float32)  # heavy tails: clipping pays
    plain = quantize_blockwise(weight, 4, 32, grid=(1.0,)).dequantize()
    searched = quantize_blockwise(weight, 4, 32, grid=RANGE_GRID).dequantize()
    assert ((searched - weight) ** 2).sum() < ((plain - weight) ** 2).sum()


def test_cpu_target_quantizes_every_weight_matmul_and_still_decodes(tmp_path, bundles, capsys):
    dense = bundles.dense("llama")
    out = tmp_path / "w8a8"
    code = main([str(dense / "model.onnx"), "--target", "cpu", "-o", str(out), "--strict", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["target"]
    assert report["bits"] == "w8a8" and report["accuracy_level"] == 4
    optimized = report["onnxruntime_optimized_graph"]
    assert optimized["float_matmuls_with_constant_weight"] == 0
    assert optimized["MatMulNBits"] == report["quantized_matmuls"] == 2 * 7 + 1  # q k v o gate up down, lm_head
    assert report["quantized_embeddings"] == 1  # the tied table, once the lm_head has its own packed copy
    ids = np.asarray([[5, 6, 7, 8, 9, 10]])
    a, _ = DecoderRunner(dense).prefill(ids)
    b, _ = DecoderRunner(out).prefill(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8


def test_cpu_target_on_a_latent_bundle(tmp_path, bundles, capsys):
    planned = tmp_path / "planned"
    assert main(["compress", "tiny-qwen2", "--budget", "kv=0.5", "-o", str(planned), "--calib-windows", "4",
                 "--calib-length", "64", "--grad-windows", "2", "-q"]) == 0
    out = tmp_path / "latent-w4a8"
    code = main([str(bundles.dense("qwen2") / "model.onnx"), "--plan", str(planned), "--target", "cpu",
                 "--bits", "w4a8", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["bits"] == "w4a8" and report["target"]["quantized_matmuls"] > 0
    assert [layer["cache"] for layer in report["graph_stage"]["layers"]] == ["latent", "latent"]
    assert len(DecoderRunner(out).generate([1, 2, 3], max_new_tokens=4)) == 4


@pytest.mark.parametrize("args,fragment", [
    (["--target", "cpu", "--bits", "w4a4"], "not available for target cpu: no target runs 4-bit activations"),
    (["--target", "npu", "--bits", "w4a4"], "not available for target npu: no target runs 4-bit activations"),
    (["--bits", "w8a8"], "--bits needs --target"),
    (["--target", "cpu", "--bits", "w3a8"], "invalid bit widths"),
    (["--target", "gpu", "--bits", "w8a8"], "not available for target gpu"),
    (["--target", "npu", "--prefill-length", "64", "--context-length", "32"], "--prefill-length"),
    (["--target", "cpu", "--precompile"], "--precompile needs --target npu"),
])
def test_bad_target_options_are_one_line_usage_errors(tmp_path, bundles, capsys, args, fragment):
    out = tmp_path / "out"
    code = main([str(bundles.dense("llama") / "model.onnx"), "-o", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_torch_mirror_of_the_weight_quantizer_matches_the_graph_quantizer():
    import torch

    from qsvd_export.compress.smooth import fake_quant_rows

    linear_weight = RNG.standard_normal((24, 80)).astype(np.float32)  # nn.Linear [out, in]
    graph = quantize_blockwise(linear_weight.T, 4, 32, symmetric=True).dequantize().T
    mirror = fake_quant_rows(torch.from_numpy(linear_weight), 4, 32).numpy()
    np.testing.assert_allclose(mirror, graph, rtol=1e-6, atol=1e-6)


def test_export_default_for_cpu_is_smoothed_w4a8_only_where_smoothing_works():
    import dataclasses

    from qsvd_export.build.stages import export_preset
    from qsvd_export.zoo import load_model

    llama = load_model("tiny-llama")
    assert export_preset(dataclasses.replace(llama, tokenizer=None), "cpu") == (None, False)  # no calibration text
    assert export_preset(dataclasses.replace(llama, tokenizer=object()), "cpu") == ("w4a8", True)
    gpt2 = load_model("tiny-gpt2")
    assert export_preset(dataclasses.replace(gpt2, tokenizer=object()), "cpu") == (None, False)
    assert export_preset(dataclasses.replace(llama, tokenizer=object()), "gpu") == (None, False)


def _lm_head_bits(model: ir.Model) -> dict[str, int]:
    outputs = {v.name for v in model.graph.outputs}
    return {n.name: n.attributes["bits"].value for n in model.graph
            if n.op_type == "MatMulNBits" and n.outputs[0].name in outputs}


def test_cpu_policy_keeps_the_lm_head_at_8_bits_under_4_bit_weights_unless_told_not_to(bundles):
    import dataclasses

    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.quant.presets import parse_bits
    from qsvd_export.targets.cpu import CPU

    dense = bundles.dense("llama") / "model.onnx"
    default, plain = load_onnx(dense), load_onnx(dense)
    report = CPU.quantize(default, parse_bits("w4a8"))
    assert list(_lm_head_bits(default).values()) == [8] and len(report["output_matmuls_at_8_bits"]) == 1
    report = dataclasses.replace(CPU, output_matmul_bits=None).quantize(plain, parse_bits("w4a8"))
    assert list(_lm_head_bits(plain).values()) == [4] and not any(k.startswith("output_") for k in report)
    bits = {n.attributes["bits"].value for n in plain.graph if n.op_type == "MatMulNBits"}
    assert bits == {4}


def test_cpu_policy_range_grid_reaches_the_weight_quantizer(bundles):
    import dataclasses

    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.quant.presets import parse_bits
    from qsvd_export.targets.cpu import CPU

    dense = bundles.dense("llama") / "model.onnx"
    plain, searched = load_onnx(dense), load_onnx(dense)
    CPU.quantize(plain, parse_bits("w4a16"))
    dataclasses.replace(CPU, weight_range_grid=RANGE_GRID).quantize(searched, parse_bits("w4a16"))
    scales = [{v.name: v.const_value.numpy() for v in m.graph.initializers.values() if v.name.endswith("/scales")}
              for m in (plain, searched)]
    assert scales[0].keys() == scales[1].keys()
    assert any(not np.array_equal(scales[0][k], scales[1][k]) for k in scales[0])  # some block range shrank
