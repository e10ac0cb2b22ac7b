"""fuse_rotary: HF's rotate-half rotary embedding → com.microsoft.RotaryEmbedding, cos/sin caches built in the graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsvd_export.passes.contracts import run_passes
from qsvd_export.passes.fuse_rotary import FuseRotaryEmbeddingPass

HEADS, DIM = 3, 8


def _rope_graph(duplicated_halves: bool = True) -> onnx.ModelProto:
    """y = x·cos + rotate_half(x)·sin, cos/sin = Unsqueeze(cos/sin(Cast(positions)[..., None] · inv_freq), 1)
    concatenated with themselves (HF) or, with ``duplicated_halves`` False, with a shifted copy."""
    half = DIM // 2
    inv_freq = (1.0 / 10000 ** (np.arange(half) / half)).astype(np.float32)
    second = inv_freq if duplicated_halves else inv_freq * 1.5
    const = lambda name, a: numpy_helper.from_array(np.asarray(a), name)  # noqa: E731
    nodes = [helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["pos_f", "last"], ["pos3"]),
             helper.make_node("Mul", ["pos3", "inv_freq"], ["f1"]),
             helper.make_node("Mul", ["pos3", "inv_freq2"], ["f2"]),
             helper.make_node("Concat", ["f1", "f2"], ["angles"], axis=-1),
             helper.make_node("Cos", ["angles"], ["cos3"]), helper.make_node("Sin", ["angles"], ["sin3"]),
             helper.make_node("Unsqueeze", ["cos3", "one"], ["cos"]),
             helper.make_node("Unsqueeze", ["sin3", "one"], ["sin"]),
             helper.make_node("Mul", ["x", "cos"], ["a"]),
             helper.make_node("Slice", ["x", "zero", "half", "last"], ["x1"]),
             helper.make_node("Slice", ["x", "half", "end", "last"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]),
             helper.make_node("Concat", ["nx2", "x1"], ["rotated"], axis=-1),
             helper.make_node("Mul", ["rotated", "sin"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    tensors = [const("last", np.asarray([-1], np.int64)), const("one", np.asarray([1], np.int64)),
               const("zero", np.asarray([0], np.int64)), const("half", np.asarray([half], np.int64)),
               const("end", np.asarray([DIM], np.int64)), const("inv_freq", inv_freq), const("inv_freq2", second)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HEADS, "s", DIM]),
                     helper.make_tensor_value_info("positions", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("positions", [[[0, 3, 7, 40, 63]], [[5000, 9000, 9001, 12, 70000]]])
def test_fused_rotary_equals_the_decomposed_one(positions):
    """Within and far past the checked range (the caches cover max(P) + 1 rows whatever P holds)."""
    proto = _rope_graph()
    model = ir.from_proto(proto)
    fuse = FuseRotaryEmbeddingPass(check_positions=64)
    run_passes(model, [fuse])
    fused = ir.to_proto(model)
    assert fuse.fused == 1 and not fuse.skipped
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("RotaryEmbedding") == 1 and "Concat" in ops  # the cache cone's own Concat, not rotate-half
    assert not any(n.op_type == "Neg" for n in fused.graph.node)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, HEADS, 5, DIM)).astype(np.float32),
             "positions": np.asarray(positions)}
    # float32 angles of large positions round alike in both graphs (the same Mul on the same inputs)
    np.testing.assert_allclose(_run(fused, feeds), _run(proto, feeds), atol=1e-5)


def test_a_rotary_whose_halves_differ_is_left_with_its_reason():
    model = ir.from_proto(_rope_graph(duplicated_halves=False))
    fuse = FuseRotaryEmbeddingPass(check_positions=64)
    run_passes(model, [fuse])
    assert fuse.fused == 0 and "do not repeat their first half" in fuse.skipped[0]
    assert "RotaryEmbedding" not in [n.op_type for n in model.graph]
