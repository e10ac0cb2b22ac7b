"""Graph stage: attention discovery, split_qkv and latent_kv on tiny exports and hand-built graphs."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch

from conftest import DECODER_FAMILIES
from qsvd_export.compress.budget import parse_budget
from qsvd_export.compress.compressor import compress_model
from qsvd_export.compress.options import CompressOptions
from qsvd_export.errors import BadInputError
from qsvd_export.export import cache_layout_from_graph
from qsvd_export.passes.chain import run_graph_stage
from qsvd_export.passes.context import GraphStageContext
from qsvd_export.passes.find_attention import find_attention
from qsvd_export.passes.latent_kv import LatentKVPass
from qsvd_export.passes.split_qkv import SplitQKVPass
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.zoo import load_model

WINDOWS = np.random.default_rng(0).integers(0, 256, (8, 24))
TOL = 1e-4


def _plan(family: str, budget: str = "kv=0.5", grouping: str = "auto"):
    loaded = load_model(f"tiny-{family}")
    allocation = "uniform" if grouping == "separate" else "qsvd"
    options = CompressOptions(parse_budget(budget), allocation=allocation, grouping=grouping, grad_windows=4, min_rank=2)
    return loaded, compress_model(loaded, options, windows=WINDOWS)


def _dense_graph(bundles, family: str) -> ir.Model:
    """The session's dense export of ``tiny-<family>``, loaded fresh (weights stay lazy on disk)."""
    return ir.load(bundles.dense(family) / "model.onnx")


def _save(model: ir.Model, folder, cache) -> None:
    from qsvd_export.bundle import BundleConfig, GraphSpec
    from qsvd_export.build.files import graph_io, save_graph

    folder.mkdir(parents=True, exist_ok=True)
    save_graph(model, folder)
    inputs, outputs = graph_io(model)
    config = BundleConfig("t", "t", "decoder", [GraphSpec("model", "model.onnx", inputs, outputs)], cache=cache)
    (folder / "qsvd_config.json").write_text(config.to_json())


def _assert_decoder_parity(runner: DecoderRunner, model, steps: int = 12) -> None:
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (2, 10))
    logits, cache = runner.prefill(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=True)
    assert np.abs(ref.logits.numpy() - logits).max() <= TOL
    past, length = ref.past_key_values, ids.shape[1]
    for _ in range(steps):
        token = rng.integers(0, 256, (2, 1))
        logits, cache = runner.step(token, np.ones((2, length + 1)), np.full((2, 1), length), cache)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(token), past_key_values=past, use_cache=True)
        past, length = ref.past_key_values, length + 1
        assert np.abs(ref.logits.numpy() - logits).max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "bert", "vit", "dinov2"])
def test_find_attention_on_every_family(family, bundles):
    model = ir.load(bundles.dense(family) / "model.onnx")
    matches = find_attention(model)
    config = load_model(f"tiny-{family}").model.config
    assert len(matches.blocks) == config.num_hidden_layers and not matches.failures
    block = matches.blocks[0]
    assert block.dims["e"] == config.hidden_size
    assert block.fused == (family == "gpt2")
    decoder = family in DECODER_FAMILIES
    assert (block.k_cache is not None) == decoder and (block.v_cache is not None) == decoder
    if decoder:
        assert block.k_cache.past.name == "past_key_values.0.key"  # found by structure, checked by name here


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_latent_graph_matches_torch_with_plan(family, tmp_path, bundles):
    loaded, plan = _plan(family)
    graph = _dense_graph(bundles, family)
    context = run_graph_stage(graph, plan)
    cache = cache_layout_from_graph(graph)
    assert [layer.kind for layer in cache] == ["latent"] * len(plan.layers)
    assert [layer.rank for layer in cache] == [layer.latent_rank for layer in plan.layers]
    assert all(layer.bytes_per_token() == 4 * layer.rank for layer in cache)
    assert all(entry["cache"] == "latent" for entry in context.report()["layers"])
    _save(graph, tmp_path, cache)
    _assert_decoder_parity(DecoderRunner(tmp_path), apply_plan(copy.deepcopy(loaded.model), plan))


@pytest.mark.parametrize("grouping", ["qkv", "separate"])
def test_other_groupings_keep_parity(grouping, tmp_path, bundles):
    loaded, plan = _plan("llama", grouping=grouping)
    exported = type("E", (), {"model": _dense_graph(bundles, "llama")})
    run_graph_stage(exported.model, plan)
    cache = cache_layout_from_graph(exported.model)
    assert all(layer.kind == "latent" for layer in cache)
    _save(exported.model, tmp_path, cache)
    _assert_decoder_parity(DecoderRunner(tmp_path), apply_plan(copy.deepcopy(loaded.model), plan))


def test_dense_layer_in_plan_keeps_dense_cache(tmp_path, bundles):
    loaded, plan = _plan("qwen2")
    plan.layers[0].groups = []
    exported = type("E", (), {"model": _dense_graph(bundles, "qwen2")})
    run_graph_stage(exported.model, plan)
    cache = cache_layout_from_graph(exported.model)
    assert [layer.kind for layer in cache] == ["dense", "latent"]
    names = [v.name for v in exported.model.graph.inputs]
    assert "past_key_values.0.key" in names and "past_key_values.1.latent" in names
    _save(exported.model, tmp_path, cache)
    _assert_decoder_parity(DecoderRunner(tmp_path), apply_plan(copy.deepcopy(loaded.model), plan))


def test_latent_kv_declines_cleanly_and_keeps_a_working_graph(tmp_path, bundles):
    loaded, plan = _plan("llama")
    exported = type("E", (), {"model": _dense_graph(bundles, "llama")})
    context = GraphStageContext(plan)
    matches = find_attention(exported.model)
    context.blocks = matches.blocks
    SplitQKVPass(context)(exported.model)
    LatentKVPass(context, mask_input="no_such_input")(exported.model)
    from qsvd_export.passes.chain import CleanupPass

    CleanupPass()(exported.model)
    report = context.report()["layers"]
    assert all(entry["cache"] == "dense" for entry in report)
    assert "no 'no_such_input' input" in report[0]["notes"][0]
    cache = cache_layout_from_graph(exported.model)
    _save(exported.model, tmp_path, cache)
    _assert_decoder_parity(DecoderRunner(tmp_path), apply_plan(copy.deepcopy(loaded.model), plan), steps=3)


def test_encoder_split_matches_torch(tmp_path, bundles):
    from qsvd_export.runtimes.sessions import create_session

    loaded, plan = _plan("bert", budget="params=0.7")
    graph = _dense_graph(bundles, "bert")
    run_graph_stage(graph, plan)
    ir.save(graph, tmp_path / "m.onnx", external_data="m.onnx.data")
    session = create_session(tmp_path / "m.onnx")
    ids = np.random.default_rng(3).integers(0, 256, (2, 9))
    mask = np.ones_like(ids)
    (out,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    with torch.no_grad():
        ref = apply_plan(copy.deepcopy(loaded.model), plan)(input_ids=torch.from_numpy(ids)).last_hidden_state
    assert np.abs(ref.numpy() - out).max() <= TOL


def test_plan_that_does_not_match_the_graph_is_refused(bundles):
    _, plan = _plan("gemma3")
    with pytest.raises(BadInputError, match="plan does not match the graph"):
        run_graph_stage(_dense_graph(bundles, "llama"), plan)


def test_dump_passes_writes_one_graph_per_pass(tmp_path, bundles):
    loaded, plan = _plan("llama")
    run_graph_stage(_dense_graph(bundles, "llama"), plan, dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert names == ["00-FindAttentionPass.onnx", "01-SplitQKVPass.onnx", "02-LatentKVPass.onnx",
                     "03-FoldValuePass.onnx", "04-AbsorbKeyPass.onnx", "05-CleanupPass.onnx"]


def _attention_graph(shared_input: bool) -> ir.Model:
    """Hand-built single-head attention: X·Wq, X·Wk, (Y or X)·Wv → softmax(QKᵀ)V."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    weights = {n: ir.Value(name=n, const_value=ir.tensor(rng.standard_normal((8, 8)).astype(np.float32)),
                           shape=ir.Shape([8, 8]), type=ir.TensorType(ir.DataType.FLOAT)) for n in "qkv"}
    nodes = []

    def op(kind, inputs, **attrs):  # type: ignore[no-untyped-def]
        node = ir.Node("", kind, inputs, attributes=[ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v)
                                                      for k, v in attrs.items()])
        nodes.append(node)
        return node.outputs[0]

    q = op("MatMul", [x, weights["q"]])
    k = op("MatMul", [x, weights["k"]])
    v = op("MatMul", [x if shared_input else y, weights["v"]])
    scores = op("MatMul", [q, op("Transpose", [k], perm=[0, 2, 1])])
    out = op("MatMul", [op("Softmax", [scores], axis=-1), v])
    out.name = "out"
    graph = ir.Graph([x, y], [out], nodes=nodes, initializers=list(weights.values()), opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_hand_built_attention_is_found_and_a_broken_one_is_reported():
    found = find_attention(_attention_graph(shared_input=True))
    assert len(found.blocks) == 1 and found.blocks[0].k_cache is None
    broken = find_attention(_attention_graph(shared_input=False))
    assert not broken.blocks
    assert broken.failures[0].reason == "Q, K and V projections do not share one input"


def test_value_up_projection_is_folded_after_attention_weights(bundles):
    _, plan = _plan("llama")
    graph = _dense_graph(bundles, "llama")
    context = run_graph_stage(graph, plan)
    notes = [note for layer in context.report()["layers"] for note in layer["notes"]]
    assert notes == ["V up-projection applied after attention weights",
                     "K up-projection not absorbed: keys are rotated or normalized per position (RoPE / k-norm): "
                     "they must be rebuilt"] * 2
    # P·V now multiplies the attention weights with the latent: [B, H, S, T] x [B, 1, T, r]
    weighted = [n for n in graph.graph if n.op_type == "MatMul" and n.inputs[1] is not None
                and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "Unsqueeze"
                and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Softmax"]
    assert len(weighted) == 2


def test_keys_are_absorbed_into_queries_without_rope(bundles):
    _, plan = _plan("gpt2")
    graph = _dense_graph(bundles, "gpt2")
    context = run_graph_stage(graph, plan)
    for layer in context.report()["layers"]:
        assert "K up-projection absorbed into the queries" in layer["notes"]
    # no key is rebuilt: nothing multiplies the latent cache by a [r, Ek] matrix any more
    latent_inputs = {v.name for v in graph.graph.inputs if v.name.endswith(".latent")}
    rebuilt = [n for n in graph.graph if n.op_type == "MatMul" and n.inputs[0] is not None
               and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Concat"
               and any(i is not None and i.name in latent_inputs for i in n.inputs[0].producer().inputs)]
    assert rebuilt == []


def _trig_graph(per_position: bool) -> ir.Model:
    """position_ids [1, 4] → Cast → Mul(inv_freq [3]) → (CumSum over seq unless ``per_position``) → Cos."""
    positions = ir.Value(name="position_ids", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.INT64))
    inv_freq = ir.Value(name="inv_freq", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(np.asarray([1.0, 0.1, 0.01], dtype=np.float32), name="inv_freq"))
    cast = ir.node("Cast", [positions], attributes={"to": ir.DataType.FLOAT}, name="cast")
    unsq = ir.node("Unsqueeze", [cast.outputs[0], ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray([-1]))}).outputs[0]])
    nodes = [cast, unsq.inputs[1].producer(), unsq]
    mul = ir.node("Mul", [unsq.outputs[0], inv_freq], name="angles")
    nodes.append(mul)
    source = mul.outputs[0]
    if not per_position:
        axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(1))})
        total = ir.node("CumSum", [source, axes.outputs[0]], name="total")
        nodes += [axes, total]
        source = total.outputs[0]
    cos = ir.node("Cos", [source], name="cos")
    nodes.append(cos)
    cos.outputs[0].name, cos.outputs[0].shape = "cos", ir.Shape([1, 4, 3])  # static graphs carry shapes
    graph = ir.Graph([positions], [cos.outputs[0]], nodes=nodes, initializers=[inv_freq], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_rotary_tables_replace_position_only_cos_by_an_exact_gather():
    from qsvd_export.passes.rotary_tables import tabulate_rotary
    import onnxruntime as ort

    model = _trig_graph(per_position=True)
    assert tabulate_rotary(model, context=10) == {"rotary_tables": ["cos_rotary_table"]}
    assert [n.op_type for n in model.graph] == ["Gather"] and "inv_freq" not in model.graph.initializers
    table = model.graph.initializers["cos_rotary_table"].const_value.numpy()
    assert table.shape == (10, 3)
    assert np.allclose(table, np.cos(np.arange(10)[:, None] * np.asarray([1.0, 0.1, 0.01])), atol=1e-6)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    positions = np.asarray([[9, 0, 3, 3]])
    assert np.array_equal(session.run(None, {"position_ids": positions})[0][0], table[positions[0]])


def test_rotary_tables_leave_a_cos_that_mixes_positions_alone():
    from qsvd_export.passes.rotary_tables import tabulate_rotary

    model = _trig_graph(per_position=False)
    before = [n.op_type for n in model.graph]
    result = tabulate_rotary(model, context=10)
    assert result["rotary_tables"] == [] and "depend on more than their own position" in " ".join(result["skipped"])
    assert [n.op_type for n in model.graph] == before


def _replace_q_weight(graph: ir.Model, change) -> None:  # type: ignore[no-untyped-def]
    """Give block 0's Q projection the weight ``change(W)`` (W [E, out], MatMul layout)."""
    node = find_attention(graph).blocks[0].q.node
    weight_input = node.inputs[1]
    if weight_input.const_value is None:  # a Transpose of the stored weight
        stored = weight_input.producer().inputs[0]
        stored.const_value = ir.tensor(np.ascontiguousarray(change(stored.const_value.numpy().T).T))
    else:
        weight_input.const_value = ir.tensor(np.ascontiguousarray(change(weight_input.const_value.numpy())))


@pytest.mark.parametrize("change, reason", [
    (lambda w: np.linalg.qr(np.random.default_rng(0).standard_normal((w.shape[0],) * 2))[0].astype(np.float32) @ w,
     "same norm, different weights"),
    (lambda w: w * np.float32(1.5), "weight norm"),
])
def test_a_plan_computed_from_other_weights_is_refused(bundles, change, reason):
    _, plan = _plan("llama")
    graph = _dense_graph(bundles, "llama")
    _replace_q_weight(graph, change)
    with pytest.raises(BadInputError, match=f"plan layer 0 was computed from other q weights than graph block 0: {reason}"):
        run_graph_stage(graph, plan)


def test_weights_rounded_to_fp16_still_match_their_plan(bundles):
    _, plan = _plan("llama")
    graph = _dense_graph(bundles, "llama")
    _replace_q_weight(graph, lambda w: w.astype(np.float16).astype(np.float32))
    run_graph_stage(graph, plan)
