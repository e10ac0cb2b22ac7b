"""8-bit latent cache I/O on the cpu target (QSVD's rebuild form): ``--kv-bits 8`` on compress and on a latent graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qsvd_export.bundle import load_bundle_config
from qsvd_export.cli import main
from qsvd_export.runtimes.decode import DecoderRunner

SMALL = ["--calib-windows", "4", "--calib-length", "64", "--grad-windows", "2", "-q"]
IDS = np.asarray([[5, 9, 3, 17, 2, 11, 4, 8, 6, 13]])


@pytest.fixture(scope="module")
def latent_bundles(tmp_path_factory):
    """The same tiny-llama plan as a float-latent cpu bundle, an 8-bit-latent one and one at the default (compile of
    one graph)."""
    root = tmp_path_factory.mktemp("latent_int8")
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(root / "float"), *SMALL]) == 0
    graph = root / "float" / "model.onnx"
    for name, extra in (("cpu", ["--kv-bits", "32"]), ("int8", ["--kv-bits", "8"]), ("default", [])):
        code = main([str(graph), "--target", "cpu", "--bits", "w8a16", *extra, "-o", str(root / name), "-q"])
        assert code == 0
    return root


def test_latent_cache_crosses_the_boundary_as_uint8_codes(latent_bundles):
    config = load_bundle_config(latent_bundles / "int8")
    plain = load_bundle_config(latent_bundles / "cpu")
    tensors = [t for layer in config.cache for t in layer.tensors]
    assert tensors and all(t.dtype == "uint8" and t.quantization["axis"] == 2 and t.quantization["zero_point"] == 128
                           for t in tensors)
    assert all(len(t.quantization["scale"]) == t.shape[-1] for t in tensors)
    assert config.kv_bytes_per_token() * 4 == plain.kv_bytes_per_token()
    proto = onnx.load(latent_bundles / "int8" / "model.onnx", load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    for t in tensors:
        assert types[t.input] == types[t.output] == onnx.TensorProto.UINT8
    # keys rebuilt and the attention-weighted latent computed on the codes by integer GEMMs: no float view of the cache
    outputs = {t.output for t in tensors}
    readers = [n for n in proto.graph.node if outputs & set(n.input)]
    assert sorted(n.op_type for n in readers) == ["MatMulIntegerToFloat"] * 4
    assert sorted(list(n.input).index(o) for n in readers for o in outputs if o in n.input) == [0, 0, 1, 1]
    # the key rebuild: scores per KV-head group (no repeated keys) and its rotary embedding fused
    ops = [n.op_type for n in proto.graph.node]
    assert "Expand" not in ops and ops.count("RotaryEmbedding") == 4  # query and rebuilt key, 2 layers
    target = json.loads((latent_bundles / "int8" / "report.json").read_text())["target"]
    assert target["grouped_query_scores"] == 2 and target["rotary_embedding"] == {"fused": 4}
    report = json.loads((latent_bundles / "int8" / "report.json").read_text())
    assert report["kv_bytes_per_token"] == config.kv_bytes_per_token()
    assert report["target"]["latent_cache"]["tensors"] == len(tensors)
    assert report["target"]["latent_cache"]["integer_value_products"] == len(tensors)  # one per latent layer
    assert report["target"]["latent_cache"]["static_scale_bytes"] == 4 * sum(t.shape[-1] for t in tensors)
    assert "uint8 codes with static per-channel scales" in (latent_bundles / "int8" / "README.md").read_text()
    assert "codes with static" not in (latent_bundles / "cpu" / "README.md").read_text()


def assert_decode_equals_prefill(runner: DecoderRunner, check_cache, split: int = 6) -> None:
    """A prefill of IDS[:, :split] then one decode step per remaining token gives the logits one prefill of all of
    IDS gives; ``check_cache(cache, length)`` runs on the cache after each step."""
    full, _ = runner.prefill(IDS)
    logits, cache = runner.prefill(IDS[:, :split])
    steps = [logits[:, -1]]
    for t in range(split, IDS.shape[1]):
        mask = np.ones((1, t + 1), dtype=np.int64)
        logits, cache = runner.step(IDS[:, t:t + 1], mask, np.asarray([[t]]), cache)
        steps.append(logits[:, -1])
        check_cache(cache, t + 1)
    np.testing.assert_allclose(np.stack(steps, 1), full[:, split - 1:], atol=1e-4)


def assert_chunked_prefill_equals_one_forward(bundle, chunk: int = 4) -> None:
    """A prefill fed ``chunk`` tokens per forward through the growing cache gives one forward's logits and cache."""
    ids = np.random.default_rng(1).integers(0, 256, (1, 11))
    whole, whole_cache = DecoderRunner(bundle, prefill_chunk=None).prefill(ids)
    chunked, chunked_cache = DecoderRunner(bundle, prefill_chunk=chunk).prefill(ids)
    assert chunked.shape == whole.shape and np.abs(chunked - whole).max() < 1e-4
    assert chunked_cache.keys() == whole_cache.keys()
    for name, value in whole_cache.items():
        assert chunked_cache[name].shape == value.shape and chunked_cache[name].dtype == value.dtype
        assert np.abs(chunked_cache[name].astype(np.float64) - value.astype(np.float64)).max() <= (
            1e-4 if value.dtype.kind == "f" else 1)  # a code may round the other way at a boundary


def test_int8_latent_prefill_in_chunks_equals_one_forward(latent_bundles):
    assert_chunked_prefill_equals_one_forward(latent_bundles / "int8")
    assert DecoderRunner(latent_bundles / "int8").prefill_chunk == 512  # unfused attention: chunked by default


def test_unfused_dense_prefill_in_chunks_equals_one_forward(bundles):
    assert_chunked_prefill_equals_one_forward(bundles.dense("llama"), chunk=3)


def test_prefill_chunk_below_one_token_is_refused(bundles):
    from qsvd_export.errors import UsageError

    with pytest.raises(UsageError, match="at least 1 token"):
        DecoderRunner(bundles.dense("llama"), prefill_chunk=0)
    with pytest.raises(UsageError, match="empty prompt"):
        DecoderRunner(bundles.dense("llama")).prefill(np.zeros((1, 0), dtype=np.int64))


def test_int8_latent_decode_equals_its_prefill(latent_bundles):
    """Decode steps over the 8-bit codes give the logits a prefill of the whole sequence gives (same codes)."""
    def uint8_codes(cache, length):
        assert all(v.dtype == np.uint8 for v in cache.values())

    assert_decode_equals_prefill(DecoderRunner(latent_bundles / "int8"), uint8_codes)


def test_int8_latent_stays_close_to_the_float_latent(latent_bundles):
    a, _ = DecoderRunner(latent_bundles / "cpu").prefill(IDS)
    b, _ = DecoderRunner(latent_bundles / "int8").prefill(IDS)
    scale = np.abs(a).max()
    assert 0 < np.abs(a - b).max() <= 0.05 * scale  # quantized (not a copy of the float graph), and close


@pytest.mark.parametrize("argv, message", [
    (["--target", "npu", "--kv-bits", "4"], "not available for target npu"),
    (["--kv-bits", "8"], "needs --target cpu"),
    (["--target", "cpu", "--kv-bits", "16"], "not available for a latent cache"),
])
def test_bad_latent_cache_requests_are_refused(latent_bundles, tmp_path, capsys, argv, message):
    assert main([str(latent_bundles / "float" / "model.onnx"), *argv, "-o", str(tmp_path / "x"), "-q"]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_dense_graph_has_no_latent_cache_to_quantize(bundles, tmp_path, capsys):
    dense = bundles.dense("llama") / "model.onnx"
    assert main([str(dense), "--target", "cpu", "--kv-bits", "8", "-o", str(tmp_path / "x"), "-q"]) != 0
    assert "this graph has none" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_standalone_runner_and_compress_write_the_int8_latent(tmp_path):
    """``compress --target cpu --kv-bits 8`` (rebuild form) writes the int8 latent; samples/run_bundle.py runs it."""
    from tests.test_samples import sample_new_ids

    out = tmp_path / "compressed"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "--target", "cpu", "--kv-bits", "8",
                 "-o", str(out), *SMALL]) == 0
    config = load_bundle_config(out)
    assert {t.dtype for layer in config.cache for t in layer.tensors} == {"uint8"}
    assert [layer.kind for layer in config.cache] == ["latent", "latent"]
    ids = [200, 13, 77, 5, 190, 33]
    eos = config.generation["eos_token_ids"]
    assert sample_new_ids(out, ids, 5) == DecoderRunner(out).generate(ids, 5, eos)


def test_int8_is_the_default_latent_cache_of_the_cpu_target(latent_bundles):
    for name in ("model.onnx", "model.onnx.data", "qsvd_config.json"):
        assert (latent_bundles / "default" / name).read_bytes() == (latent_bundles / "int8" / name).read_bytes()


def test_the_default_leaves_a_dense_cache_as_it_is(bundles, tmp_path):
    out = tmp_path / "dense-cpu"
    assert main([str(bundles.dense("llama") / "model.onnx"), "--target", "cpu", "-o", str(out), "-q"]) == 0
    assert {t.dtype for layer in load_bundle_config(out).cache for t in layer.tensors} == {"float32"}


def _latent_cache_graph(rank: int = 4):
    """present.0.latent = Concat(past, new · 1, axis=1); y = present · 2 (the reader of the float present)."""
    from onnx import TensorProto, helper

    two = onnx.numpy_helper.from_array(np.asarray(2.0, np.float32), "two")
    nodes = [helper.make_node("Identity", ["new"], ["new_latent"]),
             helper.make_node("Concat", ["past_key_values.0.latent", "new_latent"], ["present.0.latent"], axis=1),
             helper.make_node("Mul", ["present.0.latent", "two"], ["y"])]
    shape = lambda n: ["batch", n, rank]  # noqa: E731
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("past_key_values.0.latent", TensorProto.FLOAT, shape("past")),
                     helper.make_tensor_value_info("new", TensorProto.FLOAT, shape("seq"))],
        [helper.make_tensor_value_info("present.0.latent", TensorProto.FLOAT, shape("total")),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, shape("total"))], [two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_pass_writes_codes_and_dequantizes_for_readers():
    """On a hand-built graph: the cache I/O becomes uint8 codes round(x / s) + 128 and the reader sees
    (codes − 128) · s."""
    import onnx_ir as ir
    import onnxruntime as ort

    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass

    scale = np.asarray([0.5, 0.25, 1.0, 0.125], np.float32)
    model = ir.from_proto(_latent_cache_graph())
    run_passes(model, [QuantizeLatentCachePass({"past_key_values.0.latent": scale})])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    past = np.asarray([[[129, 126, 131, 228]]], np.uint8)
    new = np.asarray([[[1.2, -0.3, 2.6, 0.5], [200.0, 0.0, -0.4, -1.0]]], np.float32)
    present, y = session.run(["present.0.latent", "y"], {"past_key_values.0.latent": past, "new": new})
    codes = np.clip(np.rint(new / scale) + 128, 0, 255).astype(np.uint8)
    assert present.dtype == np.uint8
    np.testing.assert_array_equal(present, np.concatenate([past, codes], axis=1))
    np.testing.assert_allclose(y, 2 * (present.astype(np.float32) - 128) * scale)


@pytest.mark.parametrize("scales, reason", [
    ({"past_key_values.0.latent": np.ones(3, np.float32)}, "scales must be 4 positive finite values"),
    ({"past_key_values.0.latent": np.asarray([1, 0, 1, 1], np.float32)}, "scales must be 4 positive"),
    ({"past_key_values.1.latent": np.ones(4, np.float32)}, "no latent cache input"),
])
def test_pass_refuses_bad_scales_by_name(scales, reason):
    import onnx_ir as ir

    from qsvd_export.passes.contracts import PassPreconditionError, run_passes
    from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass

    with pytest.raises(PassPreconditionError, match=reason):
        run_passes(ir.from_proto(_latent_cache_graph()), [QuantizeLatentCachePass(scales)])


def test_a_bare_latent_graph_without_tokenizer_is_refused_by_name(latent_bundles, tmp_path, capsys):
    """The default 8-bit latent calibrates on text: a graph with neither bundle nor tokenizer says so, writes nothing."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(latent_bundles / "float" / name, bare / name)
    assert main([str(bare / "model.onnx"), "--target", "cpu", "-o", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer: give --tokenizer HF_DIR, or --kv-bits 32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main([str(bare / "model.onnx"), "--target", "cpu", "--kv-bits", "32", "-o", str(tmp_path / "y"), "-q"]) == 0


def test_decode_macs_count_the_integer_products(latent_bundles):
    """benchmarks.decode_macs counts MatMulIntegerToFloat: per layer, the cached tokens × r × (the key width for the
    key rebuild + 2 × heads for the attention-weighted latent, whose probabilities take two rows each)."""
    from benchmarks.decode_macs import decode_macs

    config = load_bundle_config(latent_bundles / "int8")
    context = 16
    counted = decode_macs(latent_bundles / "int8", context=context)
    key_width = config.model_config["num_key_value_heads"] * config.model_config["head_dim"]
    rows = 2 * config.model_config["num_attention_heads"]
    expected = sum((context + 1) * layer.tensors[0].shape[-1] * (key_width + rows) for layer in config.cache)
    assert counted["macs_by_op"]["MatMulIntegerToFloat"] == expected


def test_a_latent_read_without_softmax_probabilities_keeps_the_float_product(tmp_path):
    """quantize_latent_cache on a graph whose latent feeds no Softmax-weighted product: codes in the I/O, no integer
    value product (the pass would have nothing to rewrite), and the report says so."""
    import onnx_ir as ir

    from qsvd_export.bundle import BundleConfig, CacheTensor, GraphSpec, LayerCache
    from qsvd_export.build.files import save_graph
    from qsvd_export.targets.latent_cache import quantize_latent_cache

    save_graph(ir.from_proto(_latent_cache_graph()), tmp_path)
    tensor = CacheTensor("past_key_values.0.latent", "present.0.latent", ["batch_size", "past_sequence_length", 4],
                         "float32", 1)
    spec = GraphSpec("model", "model.onnx", [tensor.input, "new"], [tensor.output, "y"])
    config = BundleConfig("hand", "llama", "decoder", [spec],
                          cache=[LayerCache(0, "latent", [tensor], rank=4)])
    entry = quantize_latent_cache(tmp_path, config, None, scales={tensor.input: np.full(4, 0.1, np.float32)})
    assert entry["integer_value_products"] == 0 and "per-step dequantize" in entry["decode"]
    proto = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    assert "MatMulIntegerToFloat" not in [n.op_type for n in proto.graph.node]
    assert config.cache[0].tensors[0].dtype == "uint8"
