"""Graph-only gradients: the ONNX graph evaluated in torch (`compress/graph_autograd.py`) must compute what
ONNX Runtime computes, and its gradients must give the torch stage's plan on the same windows."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qsvd_export.compress import graph_autograd
from qsvd_export.compress.budget import parse_budget
from qsvd_export.compress.compressor import compress_model
from qsvd_export.compress.options import CompressOptions
from qsvd_export.compress.graph_autograd import TorchGraph, UnsupportedGraph
from qsvd_export.compress.graph_only import graph_only_plan
from qsvd_export.runtimes.feeds import first_step_feed
from qsvd_export.zoo import load_model


def _one_node(op: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray], outputs: int = 1,
              **attrs) -> onnx.ModelProto:
    names = [*inputs, *constants]
    node = helper.make_node(op, [n if n else "" for n in names], [f"y{i}" for i in range(outputs)], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs.items()],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.UNDEFINED, None) for i in range(outputs)],
        [onnx.numpy_helper.from_array(a, n) for n, a in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


X = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8) / 7 - 3
I64 = np.int64
CASES = [
    ("Slice", {"x": X}, {"s": np.array([7, 2], I64), "e": np.array([-9, 0], I64), "a": np.array([2, 1], I64),
                         "st": np.array([-2, -1], I64)}, 1, {}),
    ("Slice", {"x": X}, {"s": np.array([1], I64), "e": np.array([1000], I64), "a": np.array([-1], I64)}, 1, {}),
    ("Split", {"x": X}, {}, 3, {"axis": -1, "num_outputs": 3}),
    ("Split", {"x": X}, {"sizes": np.array([5, 3], I64)}, 2, {"axis": 2}),
    ("Gather", {"x": X}, {"i": np.array([[0, -1], [2, 1]], I64)}, 1, {"axis": 1}),
    ("Gather", {"x": X}, {"i": np.array(-2, I64)}, 1, {"axis": 2}),
    ("Reshape", {"x": X}, {"shape": np.array([0, -1, 4], I64)}, 1, {}),
    ("Expand", {"x": X[:, :1]}, {"shape": np.array([3, 1], I64)}, 1, {}),
    ("Transpose", {"x": X}, {}, 1, {"perm": [2, 0, 1]}),
    ("Unsqueeze", {"x": X}, {"axes": np.array([-1, 0], I64)}, 1, {}),
    ("Squeeze", {"x": X[:, :1]}, {"axes": np.array([1], I64)}, 1, {}),
    ("ReduceMean", {"x": X}, {"axes": np.array([-1], I64)}, 1, {"keepdims": 1}),
    ("ReduceSum", {"x": X}, {}, 1, {"keepdims": 0}),
    ("Gemm", {"a": X[0], "b": X[1]}, {"c": np.ones(3, np.float32)}, 1, {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("LayerNormalization", {"x": X}, {"g": np.linspace(0.5, 2, 8, dtype=np.float32),
                                      "b": np.linspace(-1, 1, 8, dtype=np.float32)}, 1, {"epsilon": 1e-5}),
    ("Softmax", {"x": X}, {}, 1, {"axis": 1}),
    ("Gelu", {"x": X}, {}, 1, {"approximate": "tanh"}),
    ("Shape", {"x": X}, {}, 1, {"start": 1, "end": -1}),
    ("Range", {}, {"a": np.array(2, I64), "b": np.array(11, I64), "d": np.array(3, I64)}, 1, {}),
    ("ConstantOfShape", {}, {"shape": np.array([2, 3], I64)}, 1,
     {"value": onnx.numpy_helper.from_array(np.array([1.5], np.float32))}),
    ("Trilu", {"x": X}, {"k": np.array(1, I64)}, 1, {"upper": 0}),
    ("Where", {"c": X > 0, "a": X}, {"b": np.zeros(1, np.float32)}, 1, {}),
    ("Div", {"a": np.array([7, -7], I64)}, {"b": np.array([2, 2], I64)}, 1, {}),
    ("Pow", {"x": np.abs(X)}, {"e": np.array(0.5, np.float32)}, 1, {}),
    ("Cast", {"x": X}, {}, 1, {"to": TensorProto.INT64}),
    ("Flatten", {"x": X}, {}, 1, {"axis": 2}),
    ("GatherElements", {"x": X}, {"i": np.array([[[0, -1, 2]] * 3] * 2, I64)}, 1, {"axis": 2}),
    ("Clip", {"x": X}, {"lo": np.array(-1, np.float32), "hi": np.array(2, np.float32)}, 1, {}),
    ("CumSum", {"x": X}, {"a": np.array(1, I64)}, 1, {"exclusive": 1, "reverse": 1}),
    ("Tile", {"x": X}, {"r": np.array([1, 2, 1], I64)}, 1, {}),
    ("Mod", {"a": np.array([7, -7, 5], I64)}, {"b": np.array([3, 3, -2], I64)}, 1, {}),
    ("Conv", {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 8)).astype(np.float32)},
     {"w": np.random.default_rng(1).standard_normal((6, 2, 3, 2)).astype(np.float32), "b": np.arange(6, dtype=np.float32)},
     1, {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 2}),
    ("Resize", {"x": X[None]}, {"": np.zeros(0, np.float32), "scales": np.array([], np.float32),
                                "sizes": np.array([1, 2, 5, 11], I64)}, 1, {"mode": "cubic"}),
    ("Resize", {"x": X[None]}, {"": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 0.5], np.float32)}, 1,
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ("Resize", {"x": X[None]}, {"": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 3], np.float32)}, 1,
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
]


@pytest.mark.parametrize("op, inputs, constants, outputs, attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_op_computes_what_the_onnx_reference_computes(op, inputs, constants, outputs, attrs):
    model = _one_node(op, inputs, constants, outputs, **attrs)
    expected = ReferenceEvaluator(model).run(None, inputs)
    got, _ = TorchGraph(ir.from_proto(model)).run(inputs)
    for i, want in enumerate(expected):
        value = got[f"y{i}"].detach().numpy()
        assert value.shape == want.shape, op
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=op)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_whole_exported_graph_matches_onnxruntime(family, bundles):
    import onnxruntime as ort

    path = bundles.dense(family) / "model.onnx"
    graph = TorchGraph.load(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(3).integers(0, 256, (1, 11))
    caches = {i.name for i in session.get_inputs() if "past" in i.name}
    feed = first_step_feed(session.get_inputs(), ids, caches)
    want = session.run(None, feed)
    got, _ = graph.run(feed)
    for name, expected in zip(graph.outputs, want):
        np.testing.assert_allclose(got[name].detach().numpy(), expected, atol=1e-4, rtol=1e-4, err_msg=name)


def test_unknown_op_is_named():
    model = _one_node("Einsum", {"a": X[0], "b": X[1].T.copy()}, {}, 1, equation="ij,jk->ik")
    with pytest.raises(UnsupportedGraph, match="ai.onnx::Einsum"):
        TorchGraph(ir.from_proto(model))


def _plans(bundles, family: str, kind: str, **options):
    dense = bundles.dense(family)
    config = json.loads((dense / "qsvd_config.json").read_text())
    windows = np.random.default_rng(0).integers(0, 256, (6, 32)).astype(np.int64)
    opts = CompressOptions(parse_budget("kv=0.5"), calib_windows=6, calib_length=32, grad_windows=4, **options)
    graph_plan = graph_only_plan(dense / "model.onnx", config["model_config"], config["model_name"],
                                 config["model_type"], kind, windows, opts, {"text": "random windows"})
    return graph_plan, compress_model(load_model(f"tiny-{family}"), opts, windows)


@pytest.mark.parametrize("family, kind", [("llama", "decoder"), ("gpt2", "decoder"), ("bert", "encoder")])
def test_graph_gradients_give_the_torch_stage_plan(family, kind, bundles):
    """Same windows, same budget: the graph's own gradients choose the torch stage's ranks and factors."""
    graph_plan, torch_plan = _plans(bundles, family, kind)
    assert graph_plan.method["importance"] == "gradient" and graph_plan.method["whitening"] == torch_plan.method["whitening"]
    assert [[(g.members, g.rank) for g in la.groups] for la in graph_plan.layers] == \
        [[(g.members, g.rank) for g in la.groups] for la in torch_plan.layers]
    for name, factor in torch_plan.tensors.items():
        # factors are unique up to the sign of each component: compare their Gram matrices
        mine = graph_plan.tensors[name]
        gram = (factor.T @ factor) if name.endswith("down") else (factor @ factor.T)
        gram_mine = (mine.T @ mine) if name.endswith("down") else (mine @ mine.T)
        assert torch.allclose(gram_mine, gram, atol=1e-4 * float(gram.abs().max()) + 1e-6), name


def test_graph_outside_the_differentiable_set_falls_back_to_energy(bundles, monkeypatch, capsys):
    monkeypatch.delitem(graph_autograd.OPS, "Softmax")
    graph_plan, _ = _plans(bundles, "llama", "decoder")
    assert graph_plan.method["importance"] == "energy" and graph_plan.calibration["gradients"].startswith("none: ops outside")
    assert "warning: graph-only gradients unavailable (ops outside the differentiable set: ai.onnx::Softmax)" \
        in capsys.readouterr().err
