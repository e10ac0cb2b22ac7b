"""Memory behaviour that lets > 2 GB models through (issue 6): weights are never held twice.

The figures on a ~3 GB synthetic LLaMA come from ``python -m benchmarks.big_model``; these tests pin the
mechanisms on small graphs: lazily transposed export weights, the torch model released once its graph is
on disk, external weights unmapped after the load-time scan.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from qsvd_export.export import defer_weight_transposes, export_graph
from qsvd_export.onnx_io import load_onnx
from qsvd_export.build.files import save_graph
from qsvd_export.build.stages import release_torch_model
from qsvd_export.zoo import load_model


def _matmul_graph(shared: bool) -> tuple[ir.Model, np.ndarray]:
    """y = x · Transpose(W) (+ y2 = Gather(W, ids) when ``shared``: W then has a second use)."""
    weight = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="W", shape=ir.Shape([6, 4]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(weight))
    transpose = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, transpose.outputs[0]])
    matmul.outputs[0].name = "y"
    matmul.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    matmul.outputs[0].shape = ir.Shape([2, 6])
    nodes, outputs = [transpose, matmul], [matmul.outputs[0]]
    inputs = [x]
    if shared:
        ids = ir.Value(name="ids", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64))
        gather = ir.node("Gather", [w, ids])
        gather.outputs[0].name = "rows"
        gather.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        nodes.append(gather)
        outputs.append(gather.outputs[0])
        inputs.append(ids)
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=[w], opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10), weight


def test_transposed_weights_are_deferred_and_written_transposed(tmp_path):
    model, weight = _matmul_graph(shared=False)
    assert defer_weight_transposes(model) == 1
    assert [n.op_type for n in model.graph] == ["MatMul"]
    (value,) = model.graph.initializers.values()
    assert isinstance(value.const_value, ir.LazyTensor)
    assert "W" not in model.graph.initializers
    save_graph(model, tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight.T, rtol=1e-6)


def test_a_weight_with_another_use_keeps_its_transpose():
    model, _ = _matmul_graph(shared=True)
    assert defer_weight_transposes(model) == 0
    assert sorted(n.op_type for n in model.graph) == ["Gather", "MatMul", "Transpose"]


def test_the_torch_model_is_freed_once_its_graph_is_written(tmp_path):
    loaded = load_model("tiny-llama")
    probe = weakref.ref(loaded.model.model.layers[0].mlp.up_proj.weight)
    exported = export_graph(loaded)
    save_graph(exported.model, tmp_path)
    assert probe() is not None
    release_torch_model(loaded, exported.model)
    gc.collect()
    assert probe() is None  # nothing (graph, exporter, rewriter caches) keeps the weights alive
    assert all(v.const_value is None for v in exported.model.graph.initializers.values())


def test_external_weights_are_unmapped_after_the_load_scan(tmp_path):
    model, _ = _matmul_graph(shared=False)
    big = ir.Value(name="big", shape=ir.Shape([4096]), type=ir.TensorType(ir.DataType.FLOAT),
                   const_value=ir.tensor(np.ones(4096, np.float32)))
    model.graph.register_initializer(big)
    save_graph(model, tmp_path)
    loaded = load_onnx(tmp_path / "model.onnx")
    external = [v.const_value for v in loaded.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert external  # the scan read them ...
    assert all(t.raw is None for t in external)  # ... and left none mapped


def test_weights_read_from_the_model_files_give_the_same_bundle(tmp_path):
    load_model("tiny-llama").model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    graphs = {}
    for from_files in (True, False):
        loaded = load_model(str(tmp_path / "hf"))
        graph = export_graph(loaded, from_files=from_files).model
        if from_files:
            lazy = [v for v in graph.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
            assert len(lazy) >= 2 * loaded.model.config.num_hidden_layers  # every projection weight, at least
            release_torch_model(loaded, ir.Model(ir.Graph([], [], nodes=[]), ir_version=10))  # model gone ...
        (tmp_path / str(from_files)).mkdir()
        save_graph(graph, tmp_path / str(from_files))  # ... and the graph still writes its weights
        graphs[from_files] = [(tmp_path / str(from_files) / name).read_bytes() for name in ("model.onnx", "model.onnx.data")]
    assert graphs[True] == graphs[False]
