"""fold_latent_scales: the 8-bit latent cache is read as codes, its scales moved into the readers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsvd_export.passes.contracts import PassPreconditionError, run_passes
from qsvd_export.passes.fold_latent_scales import FoldLatentScalesPass, latent_dequantizers
from qsvd_export.quant.matmul_nbits import pack_matmulnbits, quantize_blockwise, unpack_matmulnbits

RANK, WIDTH, HEADS = 40, 24, 3
RNG = np.random.default_rng(7)


@pytest.mark.parametrize("bits, symmetric, k", [(8, True, 40), (4, False, 40), (4, True, 64), (8, False, 33)])
def test_unpack_inverts_the_packing(bits, symmetric, k):
    weight = RNG.standard_normal((k, 16)).astype(np.float32)
    blocks = quantize_blockwise(weight, bits, 16, symmetric=symmetric)
    packed, scales, zeros = pack_matmulnbits(blocks)
    back = unpack_matmulnbits(packed, scales, None if symmetric else zeros, k, 16, bits, 16)
    np.testing.assert_array_equal(back.dequantize(), blocks.dequantize())


def _nbits_node(weight: np.ndarray, bits: int, name: str, inputs: list[str]) -> tuple[onnx.NodeProto, list]:
    packed, scales, zeros = pack_matmulnbits(quantize_blockwise(weight, bits, 16))
    tensors = [numpy_helper.from_array(packed, f"{name}_B"), numpy_helper.from_array(scales, f"{name}_scales"),
               numpy_helper.from_array(zeros, f"{name}_zeros")]
    node = helper.make_node("MatMulNBits", inputs + [t.name for t in tensors], [name], domain="com.microsoft",
                            K=weight.shape[0], N=weight.shape[1], bits=bits, block_size=16)
    return node, tensors


def _graph_with_readers(bits: int, unsigned: bool = True) -> onnx.ModelProto:
    """present.0.latent uint8 (zero point 128) or int8 (0) [1, T, r] → DequantizeLinear(axis 2) → four readers:
    MatMulNBits (the key rebuild),
    MatMul with a constant weight, MatMul(P, Unsqueeze(latent)) (the weighted latent) and Mul (anything else)."""
    scale = (RNG.random(RANK) * 0.1 + 1e-3).astype(np.float32)
    nbits, nbits_tensors = _nbits_node(RNG.standard_normal((RANK, WIDTH)).astype(np.float32), bits, "keys",
                                       ["latent"])
    nodes = [
        helper.make_node("Concat", ["past_key_values.0.latent", "new"], ["present.0.latent"], axis=1),
        helper.make_node("DequantizeLinear", ["present.0.latent", "scale", "zero"], ["latent"], axis=2),
        nbits,
        helper.make_node("MatMul", ["latent", "w"], ["plain"]),
        helper.make_node("Unsqueeze", ["latent", "one"], ["latent4"]),
        helper.make_node("MatMul", ["probs", "latent4"], ["weighted"]),
        helper.make_node("Mul", ["latent", "two"], ["other"]),
    ]
    zero = np.full(RANK, 128, np.uint8) if unsigned else np.zeros(RANK, np.int8)
    tensors = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero, "zero"),
               numpy_helper.from_array(RNG.standard_normal((RANK, WIDTH)).astype(np.float32), "w"),
               numpy_helper.from_array(np.asarray([1], np.int64), "one"),
               numpy_helper.from_array(np.asarray(2.0, np.float32), "two"), *nbits_tensors]
    element = TensorProto.UINT8 if unsigned else TensorProto.INT8
    cache = lambda n: helper.make_tensor_value_info(n, element, [1, None, RANK])  # noqa: E731
    outputs = [cache("present.0.latent")] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                             for n in ("keys", "plain", "weighted", "other")]
    graph = helper.make_graph(nodes, "g", [cache("past_key_values.0.latent"), cache("new"),
                                           helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                                         [1, HEADS, 1, None])], outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["keys", "plain", "weighted", "other"], feeds)


@pytest.mark.parametrize("bits, unsigned", [(8, True), (4, True), (8, False)])
def test_folded_graph_computes_what_the_dequantized_one_does(bits, unsigned):
    proto = _graph_with_readers(bits, unsigned)
    low, high, dtype = (1, 256, np.uint8) if unsigned else (-127, 128, np.int8)
    feeds = {"past_key_values.0.latent": RNG.integers(low, high, (1, 30, RANK)).astype(dtype),
             "new": RNG.integers(low, high, (1, 1, RANK)).astype(dtype),
             "probs": RNG.dirichlet(np.ones(31), (1, HEADS, 1)).astype(np.float32)}
    expected = _run(proto, feeds)
    model = ir.from_proto(proto)
    run_passes(model, [FoldLatentScalesPass()])
    folded = ir.to_proto(model)
    got = _run(folded, feeds)
    # keys: the folded weight is rounded per column to int8 (uint8 codes) — within a percent of the largest key;
    # the rest is float rounding
    for name, a, b in zip(("keys", "plain", "weighted", "other"), expected, got):
        tolerance = 1e-2 if name == "keys" and unsigned else 1e-4
        np.testing.assert_allclose(b, a, rtol=0, atol=tolerance * np.abs(a).max(), err_msg=name)
    ops = [n.op_type for n in folded.graph.node]
    assert "MatMulNBits" not in ops and not latent_dequantizers(model.graph)
    view = "DequantizeLinear" if unsigned else "Cast"  # code − 128 per tensor, or the int8 codes as they are
    assert ops.count(view) == 1
    codes = next(n.output[0] for n in folded.graph.node if n.op_type == view)
    readers = sorted(n.op_type for n in folded.graph.node if codes in n.input)
    # the cache is multiplied only for the reader nothing else could take the scales (the Mul)
    assert readers == (["MatMul", "Mul", "Unsqueeze"] if unsigned else ["MatMul", "MatMul", "Mul", "Unsqueeze"])
    if unsigned:  # keys straight from the codes
        integer = [n for n in folded.graph.node if n.op_type == "MatMulIntegerToFloat"]
        assert len(integer) == 1 and integer[0].input[0] == "present.0.latent"


def test_a_graph_without_a_dequantized_latent_is_refused():
    model = ir.from_proto(_graph_with_readers(8))
    run_passes(model, [FoldLatentScalesPass()])
    with pytest.raises(PassPreconditionError, match="no DequantizeLinear of a coded latent cache"):
        run_passes(model, [FoldLatentScalesPass()])
