"""grouped_query_scores: attention scores over repeated KV heads become one MatMul per KV-head group."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsvd_export.passes.contracts import run_passes
from qsvd_export.passes.grouped_query_scores import GroupedQueryScoresPass

HEADS, KV_HEADS, DIM = 6, 2, 8


def _scores_graph(shaped_expand: bool, unsqueeze_axis: int = 2) -> onnx.ModelProto:
    """scores = MatMul(Q, Transpose(Reshape(Expand(Unsqueeze(K, [axis]), [1, 1, rep, 1, 1]), [0, H, -1, D])));
    the Expand's output shape is declared or left to the constant."""
    rep = HEADS // KV_HEADS
    expand_shape = [1, 1, rep, 1, 1] if unsqueeze_axis == 2 else [1, rep, 1, 1, 1]
    nodes = [helper.make_node("Unsqueeze", ["k", "axes"], ["k5"]),
             helper.make_node("Expand", ["k5", "expand_shape"], ["k_rep"]),
             helper.make_node("Reshape", ["k_rep", "heads_shape"], ["k_heads"]),
             helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1)]
    tensors = [numpy_helper.from_array(np.asarray([unsqueeze_axis], np.int64), "axes"),
               numpy_helper.from_array(np.asarray(expand_shape, np.int64), "expand_shape"),
               numpy_helper.from_array(np.asarray([0, HEADS, -1, DIM], np.int64), "heads_shape")]
    info = [helper.make_tensor_value_info("k_heads", TensorProto.FLOAT, [1, HEADS, "t", DIM])]
    if shaped_expand:
        info.append(helper.make_tensor_value_info("k_rep", TensorProto.FLOAT, [1, KV_HEADS, rep, "t", DIM]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, HEADS, "s", DIM]),
                     helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, KV_HEADS, "t", DIM])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)], tensors, value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _probs(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("shaped_expand", [True, False])
def test_grouped_scores_equal_the_repeated_ones(shaped_expand):
    rng = np.random.default_rng(3)
    feeds = {"q": rng.standard_normal((1, HEADS, 3, DIM)).astype(np.float32),
             "k": rng.standard_normal((1, KV_HEADS, 11, DIM)).astype(np.float32)}
    proto = _scores_graph(shaped_expand)
    model = ir.from_proto(proto)
    rewrite = GroupedQueryScoresPass()
    run_passes(model, [rewrite])
    grouped = ir.to_proto(model)
    assert rewrite.rewritten == 1 and not [n for n in grouped.graph.node if n.op_type == "Expand"]
    np.testing.assert_allclose(_probs(grouped, feeds), _probs(proto, feeds), rtol=1e-6, atol=1e-6)


def test_a_repeat_that_interleaves_heads_is_left_alone():
    """Unsqueeze at axis 1 puts the copies of different KV heads next to each other (head h reads KV head h mod
    KVH): regrouping the queries would pair them wrongly, so the pass must not match."""
    model = ir.from_proto(_scores_graph(False, unsqueeze_axis=1))
    rewrite = GroupedQueryScoresPass()
    run_passes(model, [rewrite])
    assert rewrite.rewritten == 0
