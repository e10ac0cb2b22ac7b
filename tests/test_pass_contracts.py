"""Every graph pass states its contract: each pass class declares ``requires`` and ``ensures``, and a graph (or
context) that violates its precondition gets that pass's named error, before the pass changes anything."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import SimpleNamespace
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qsvd_export.passes as passes_package
from qsvd_export.errors import BadInputError
from qsvd_export.passes.absorb_key import AbsorbKeyPass
from qsvd_export.passes.chain import CleanupPass, FindAttentionPass
from qsvd_export.passes.context import GraphStageContext
from qsvd_export.passes.contracts import GraphPass, PassPostconditionError, PassPreconditionError
from qsvd_export.passes.float16 import Float16Pass
from qsvd_export.passes.fold_latent_scales import FoldLatentScalesPass
from qsvd_export.passes.fold_rotations import FoldRotationsPass
from qsvd_export.passes.fold_value import FoldValuePass
from qsvd_export.passes.fuse_rotary import FuseRotaryEmbeddingPass
from qsvd_export.passes.group_query_attention import FuseGroupQueryAttentionPass
from qsvd_export.passes.integer_value_product import IntegerValueProductPass
from qsvd_export.passes.grouped_query_scores import GroupedQueryScoresPass
from qsvd_export.passes.latent_kv import LatentKVPass
from qsvd_export.passes.latent_sink import KeepLatentSinkPass
from qsvd_export.passes.low_precision import FuseNormsAndClampMasksPass
from qsvd_export.passes.quantize_embedding import QuantizeEmbeddingPass
from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass
from qsvd_export.passes.quantize_weights import QuantizeWeightsPass
from qsvd_export.passes.rotary_tables import TabulateRotaryPass
from qsvd_export.passes.split_qkv import SplitQKVPass
from qsvd_export.passes.static_shapes import SpecializeDecoderPass
from qsvd_export.passes.unfuse_attention import UnfuseAttentionPass
from qsvd_export.passes.untie_embedding import UntieEmbeddingPass


def _matmul_model(opset: int = 21, extra: list[onnx.NodeProto] | None = None) -> ir.Model:
    """y = x · W with W [32, 32] constant."""
    weight = numpy_helper.from_array(np.eye(32, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"), *(extra or [])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [weight])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _dynamic_model() -> ir.Model:
    """y = x · W with x [batch, 32]."""
    weight = numpy_helper.from_array(np.eye(32, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [weight])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _empty_model() -> ir.Model:
    return ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)


def _dangling_model() -> ir.Model:
    model = _matmul_model()
    node = ir.node("Relu", [ir.Value(name="ghost")], name="reads_a_ghost")
    model.graph.append(node)
    return model


def _attention_in_opset_21() -> ir.Model:
    attention = helper.make_node("Attention", ["y", "y", "y"], ["a"], name="attn")
    return _matmul_model(extra=[attention])


def _latent_layers_without_latent() -> GraphStageContext:
    context = GraphStageContext(plan=SimpleNamespace(layers=[]))
    context.layers[0] = SimpleNamespace(cache="latent", latent_all=None, notes=[])  # type: ignore[assignment]
    return context


# pass class → (the pass, a model violating its precondition, a fragment of the reason)
VIOLATIONS: dict[type, Callable[[], tuple[ir.passes.PassBase, ir.Model, str]]] = {
    FindAttentionPass: lambda: (FindAttentionPass(GraphStageContext(None)), _empty_model(), "no nodes"),
    CleanupPass: lambda: (CleanupPass(), _dangling_model(), "'ghost' is produced by nothing"),
    SplitQKVPass: lambda: (SplitQKVPass(GraphStageContext(None)), _matmul_model(), "needs a CompressionPlan"),
    LatentKVPass: lambda: (LatentKVPass(GraphStageContext(SimpleNamespace(), blocks=[SimpleNamespace(index=0)])),
                           _matmul_model(), "split_qkv has not run on blocks [0]"),
    FoldValuePass: lambda: (FoldValuePass(_latent_layers_without_latent()), _matmul_model(), "left no latent"),
    AbsorbKeyPass: lambda: (AbsorbKeyPass(_latent_layers_without_latent()), _matmul_model(), "left no latent"),
    FoldRotationsPass: lambda: (FoldRotationsPass(GraphStageContext(SimpleNamespace(method={}))), _matmul_model(),
                                "no residual rotation"),
    QuantizeWeightsPass: lambda: (QuantizeWeightsPass(3), _matmul_model(), "3-bit weights"),
    QuantizeEmbeddingPass: lambda: (QuantizeEmbeddingPass(12), _matmul_model(), "block size 12"),
    UnfuseAttentionPass: lambda: (UnfuseAttentionPass(), _attention_in_opset_21(), "opset-21 graph"),
    SpecializeDecoderPass: lambda: (SpecializeDecoderPass(8, 4), _matmul_model(), "1 <= sequence (8) < context (4)"),
    FuseNormsAndClampMasksPass: lambda: (FuseNormsAndClampMasksPass(float("inf")), _matmul_model(), "mask value inf"),
    TabulateRotaryPass: lambda: (TabulateRotaryPass(64), _dynamic_model(), "need a static graph"),
    FuseGroupQueryAttentionPass: lambda: (FuseGroupQueryAttentionPass({3: None}), _matmul_model(),  # type: ignore[dict-item]
                                          "blocks [3], the graph has 0 attention blocks"),
    Float16Pass: lambda: (Float16Pass(mask_value=1e6), _matmul_model(), "not a positive float16"),
    UntieEmbeddingPass: lambda: (UntieEmbeddingPass(), _dangling_model(), "'ghost' is produced by nothing"),
    FoldLatentScalesPass: lambda: (FoldLatentScalesPass(), _matmul_model(), "no DequantizeLinear of a coded latent"),
    GroupedQueryScoresPass: lambda: (GroupedQueryScoresPass(), _dangling_model(), "'ghost' is produced by nothing"),
    FuseRotaryEmbeddingPass: lambda: (FuseRotaryEmbeddingPass(0), _matmul_model(), "check_positions must be ≥ 1"),
    QuantizeLatentCachePass: lambda: (QuantizeLatentCachePass({"past_key_values.0.latent": np.ones(4, np.float32)}),
                                      _matmul_model(), "no latent cache input 'past_key_values.0.latent'"),
    KeepLatentSinkPass: lambda: (KeepLatentSinkPass(["past_key_values.0.latent"]), _matmul_model(),
                                 "no latent cache input 'past_key_values.0.latent'"),
    IntegerValueProductPass: lambda: (IntegerValueProductPass(), _matmul_model(),
                                      "no Softmax-weighted product over a uint8 latent cache"),
}


def _pass_classes() -> list[type]:
    """Every concrete pass class defined in the passes package."""
    found = set()
    for info in pkgutil.iter_modules(passes_package.__path__):
        if info.name.startswith("_"):  # shared bases (_latent_layer.LatentLayerPass)
            continue
        module = importlib.import_module(f"{passes_package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ir.passes.PassBase) and cls.__module__ == module.__name__ \
                    and not inspect.isabstract(cls) and not cls.__name__.startswith("_") and "call" in _own_methods(cls):
                found.add(cls)
    return sorted(found, key=lambda c: c.__name__)


def _own_methods(cls: type) -> set[str]:
    """Methods defined by ``cls`` or a project base class (not onnx_ir's defaults, not GraphPass's stubs)."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base.__module__.startswith("qsvd_export.passes") and base is not GraphPass:
            names.update(k for k, v in vars(base).items() if callable(v))
    return names


def test_every_pass_class_is_covered_here() -> None:
    classes = _pass_classes()
    assert len(classes) >= 10
    assert set(classes) == set(VIOLATIONS), "a pass without a precondition test here (or a stale entry)"


@pytest.mark.parametrize("cls", _pass_classes(), ids=lambda c: c.__name__)
def test_pass_declares_requires_and_ensures(cls: type) -> None:
    assert issubclass(cls, GraphPass)
    assert {"requires", "ensures"} <= _own_methods(cls)


@pytest.mark.parametrize("cls", list(VIOLATIONS), ids=lambda c: c.__name__)
def test_violated_precondition_gives_the_pass_named_error(cls: type) -> None:
    pass_, model, reason = VIOLATIONS[cls]()
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(PassPreconditionError) as caught:
        pass_(model)
    assert caught.value.pass_name == cls.__name__ and reason in str(caught.value)
    assert str(caught.value).startswith(f"{cls.__name__}: ")
    assert isinstance(caught.value, BadInputError) and isinstance(caught.value, ir.passes.PreconditionError)
    assert ir.to_proto(model).SerializeToString() == before  # nothing changed


def test_an_unkept_promise_is_a_postcondition_error() -> None:
    class Lazy(QuantizeWeightsPass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            return ir.passes.PassResult(model, False)

    with pytest.raises(PassPostconditionError, match="Lazy: a float MatMul weight is left \\(node proj\\)"):
        Lazy(8)(_matmul_model())
    QuantizeWeightsPass(8)(_matmul_model())  # the real pass keeps it


def test_float16_keeps_its_io_promise() -> None:
    model = _matmul_model()
    half = Float16Pass(keep_float32=())
    half(model)
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    with pytest.raises(PassPostconditionError, match="graph value x is"):
        Float16Pass(keep_float32=()).ensures(_matmul_model())


def test_latent_cache_io_contract_is_checked() -> None:
    block = SimpleNamespace(k_cache=SimpleNamespace(past=SimpleNamespace(name="past_key_values.0.key")),
                            v_cache=SimpleNamespace(past=SimpleNamespace(name="past_key_values.0.value")))
    context = GraphStageContext(SimpleNamespace(), blocks=[SimpleNamespace(index=0)])
    context.layers[0] = SimpleNamespace(cache="latent", block=block, latents=[], notes=[])  # type: ignore[assignment]
    kv = LatentKVPass(context)
    with pytest.raises(PassPostconditionError, match="layer 0 is latent but its cache I/O is not"):
        kv.ensures(_matmul_model())


def test_graph_stage_reports_a_contract_error_by_pass_name() -> None:
    from qsvd_export.passes.chain import run_graph_stage

    with pytest.raises(BadInputError, match="^CleanupPass: input 'ghost' is produced by nothing"):
        run_graph_stage(_dangling_model(), None)

