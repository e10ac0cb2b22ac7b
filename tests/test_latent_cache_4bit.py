"""4-bit latent cache I/O on the cpu target (``--kv-bits 4``): two codes per byte, saturated, MSE-clipped scales,
the first token's latent kept exact beside them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qsvd_export.bundle import load_bundle_config
from qsvd_export.cli import main
from qsvd_export.runtimes.decode import DecoderRunner
from tests.test_latent_cache_8bit import (IDS, SMALL, _latent_cache_graph, assert_chunked_prefill_equals_one_forward,
                                         assert_decode_equals_prefill)


@pytest.fixture(scope="module")
def bundles4(tmp_path_factory):
    """One tiny-llama kv=0.5 plan as a float-latent, an 8-bit-latent and a 4-bit-latent cpu bundle."""
    root = tmp_path_factory.mktemp("latent_int4")
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(root / "float"), *SMALL]) == 0
    graph = root / "float" / "model.onnx"
    for name, bits in (("cpu", "32"), ("int8", "8"), ("int4", "4")):
        code = main([str(graph), "--target", "cpu", "--bits", "w8a16", "--kv-bits", bits, "-o", str(root / name),
                     "-q"])
        assert code == 0
    return root


def test_packed_codes_cross_the_boundary_at_half_a_byte_per_channel(bundles4):
    config = load_bundle_config(bundles4 / "int4")
    eight = load_bundle_config(bundles4 / "int8")
    tensors = [layer.tensors[0] for layer in config.cache]
    for t, t8, layer in zip(tensors, (layer.tensors[0] for layer in eight.cache), config.cache):
        rank = len(t8.quantization["scale"])
        assert layer.rank == rank and len(t.quantization["scale"]) == rank
        assert t.dtype == "uint8" and t.shape[-1] == (rank + 1) // 2
        assert t.quantization["bits"] == 4 and t.quantization["zero_point"] == 8 and "low nibble" in \
            t.quantization["packing"]
        sink = layer.tensors[1]  # the exact first token: float32 [batch, ≤ 1, r], bounded
        assert (sink.input, sink.output) == (t.input + "_sink", t.output + "_sink")
        assert sink.dtype == "float32" and sink.shape[-1] == rank and sink.max_length == 1
    assert config.kv_bytes_per_token() == sum((len(t.quantization["scale"]) + 1) // 2 for t in tensors)
    assert config.kv_bytes_per_token() * 2 >= eight.kv_bytes_per_token()
    assert config.kv_fixed_bytes() == 4 * sum(layer.rank for layer in config.cache)
    proto = onnx.load(bundles4 / "int4" / "model.onnx", load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    assert all(types[t.input] == types[t.output] == onnx.TensorProto.UINT8 for t in tensors)
    assert all(types[t.input + "_sink"] == types[t.output + "_sink"] == onnx.TensorProto.FLOAT for t in tensors)
    ops = [n.op_type for n in proto.graph.node]
    # per layer: the key rebuild and the attention-weighted latent, both integer products on the unpacked codes
    assert ops.count("MatMulIntegerToFloat") == 4 and ops.count("BitwiseAnd") == 2 and ops.count("Clip") >= 2
    report = json.loads((bundles4 / "int4" / "report.json").read_text())
    assert report["target"]["latent_cache"]["bits"] == 4
    assert report["target"]["latent_cache"]["integer_value_products"] == len(tensors)
    assert report["target"]["latent_cache"]["sink_bytes"] == config.kv_fixed_bytes()
    assert report["kv_bytes_per_token"] == config.kv_bytes_per_token()
    assert "4-bit codes, two per uint8 byte" in (bundles4 / "int4" / "README.md").read_text()


def test_int4_latent_prefill_in_chunks_equals_one_forward(bundles4):
    """The exact first token (sink pair) is taken by the first chunk and carried through the later ones."""
    assert_chunked_prefill_equals_one_forward(bundles4 / "int4")


def test_int4_latent_decode_equals_its_prefill(bundles4):
    def packed_codes_and_one_sink_row(cache, length):
        codes = {k: v for k, v in cache.items() if not k.endswith("_sink")}
        assert all(v.dtype == np.uint8 and v.shape[1] == length for v in codes.values())
        assert all(cache[k + "_sink"].shape[1] == 1 for k in codes)

    assert_decode_equals_prefill(DecoderRunner(bundles4 / "int4"), packed_codes_and_one_sink_row)


def test_int4_latent_is_coarser_than_int8_and_still_close(bundles4):
    base, _ = DecoderRunner(bundles4 / "cpu").prefill(IDS)
    err8 = np.abs(DecoderRunner(bundles4 / "int8").prefill(IDS)[0] - base).max()
    err4 = np.abs(DecoderRunner(bundles4 / "int4").prefill(IDS)[0] - base).max()
    assert err8 < err4 <= 0.25 * np.abs(base).max()


def test_standalone_runner_drives_the_packed_cache(bundles4):
    from tests.test_samples import sample_new_ids

    out = bundles4 / "int4"
    ids = [200, 13, 77, 5, 190, 33]
    eos = load_bundle_config(out).generation["eos_token_ids"]
    assert sample_new_ids(out, ids, 5) == DecoderRunner(out).generate(ids, 5, eos)


@pytest.mark.parametrize("rank", [4, 5])
def test_pass_packs_two_saturated_codes_per_byte(rank):
    """Hand-built graph: byte j = code[j] | code[j + ⌈r/2⌉] << 4, codes round(x / s) + 8 saturated to [1, 15];
    the reader sees (code − 8) · s; an odd r pads the last high nibble with the zero code."""
    import onnx_ir as ir
    import onnxruntime as ort

    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass

    scale = np.asarray([0.5, 0.25, 1.0, 0.125, 2.0][:rank], np.float32)
    model = ir.from_proto(_latent_cache_graph(rank))
    run_passes(model, [QuantizeLatentCachePass({"past_key_values.0.latent": scale}, bits=4)])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    half = (rank + 1) // 2
    past = np.asarray([[[0x9A, 0x78, 0x8F][:half]]], np.uint8)
    new = np.asarray([[[1.2, -0.3, 2.6, 0.5, -9.0][:rank], [200.0, 0.0, -0.4, -1.0, 3.1][:rank]]], np.float32)
    present, y = session.run(["present.0.latent", "y"], {"past_key_values.0.latent": past, "new": new})
    codes = np.clip(np.rint(new / scale) + 8, 1, 15).astype(np.uint8)
    if rank % 2:
        codes = np.concatenate([codes, np.full((1, 2, 1), 8, np.uint8)], axis=2)
    packed = codes[..., :half] | (codes[..., half:] << 4)
    assert present.dtype == np.uint8 and present.shape == (1, 3, half)
    np.testing.assert_array_equal(present, np.concatenate([past, packed], axis=1))
    unpacked = np.concatenate([present & 15, present >> 4], axis=2)[..., :rank].astype(np.float32)
    np.testing.assert_allclose(y, 2 * (unpacked - 8) * scale)


def test_mse_scales_clip_outliers_and_never_lose_to_the_peak():
    from qsvd_export.targets.latent_cache import mse_scales

    rng = np.random.default_rng(0)
    values = rng.standard_normal((4096, 3)).astype(np.float32)
    values[0] = [40.0, 3.0, -2.5]  # one outlier token in channel 0
    scale = mse_scales({"x": values}, 7)["x"]
    peak = np.abs(values).max(axis=0)
    assert scale[0] < 0.5 * peak[0] / 7  # the outlier channel is clipped hard

    def error(s):
        return np.square(np.clip(np.rint(values / s), -7, 7) * s - values).mean(axis=0)

    assert np.all(error(scale) <= error(peak / 7))


def test_the_first_token_is_read_from_the_sink_not_from_its_codes(bundles4):
    """A decode step's output does not depend on row 0's 4-bit codes, and does depend on the exact sink."""
    runner = DecoderRunner(bundles4 / "int4")
    _, cache = runner.prefill(IDS[:, :6])
    step = (IDS[:, 6:7], np.ones((1, 7), np.int64), np.asarray([[6]]))
    base, _ = runner.step(*step, cache)
    scrambled = dict(cache)
    for name in [k for k in cache if not k.endswith("_sink")]:
        codes = cache[name].copy()
        codes[:, 0] = 0x11  # code 1 in both nibbles: −7 · s on every channel
        scrambled[name] = codes
    np.testing.assert_allclose(runner.step(*step, scrambled)[0], base, atol=1e-5)
    moved = {k: v * 1.5 if k.endswith("_sink") else v for k, v in cache.items()}
    assert np.abs(runner.step(*step, moved)[0] - base).max() > 1e-3


def test_the_sink_pass_refuses_an_8bit_cache_by_name():
    import onnx_ir as ir

    from qsvd_export.passes.contracts import PassPreconditionError, run_passes
    from qsvd_export.passes.latent_sink import KeepLatentSinkPass
    from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass

    model = ir.from_proto(_latent_cache_graph())
    run_passes(model, [QuantizeLatentCachePass({"past_key_values.0.latent": np.ones(4, np.float32)})])
    with pytest.raises(PassPreconditionError, match="is not a 4-bit coded latent cache"):
        run_passes(model, [KeepLatentSinkPass(["past_key_values.0.latent"])])


def test_sink_pass_on_a_hand_built_graph():
    """Quantize (4-bit) → fold → sink on ``y = 2 · present``: row 0 of y is 2 · the exact first latent, in a
    prefill (empty past: the new tokens' first row) and in a decode (the past sink), the rest 2 · the codes' values."""
    import onnx_ir as ir
    import onnxruntime as ort

    from qsvd_export.passes.contracts import run_passes
    from qsvd_export.passes.fold_latent_scales import FoldLatentScalesPass
    from qsvd_export.passes.latent_sink import KeepLatentSinkPass
    from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass

    name = "past_key_values.0.latent"
    scale = np.asarray([0.5, 0.25, 1.0, 0.125, 2.0], np.float32)
    model = ir.from_proto(_latent_cache_graph(5))
    run_passes(model, [QuantizeLatentCachePass({name: scale}, bits=4), FoldLatentScalesPass(),
                       KeepLatentSinkPass([name])])
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = ["present.0.latent", "present.0.latent_sink", "y"]
    new = np.asarray([[[0.33, -0.07, 0.4, 0.01, -0.9], [1.2, -0.3, 2.6, 0.5, 3.1]]], np.float32)
    present, sink, y = session.run(outputs, {name: np.zeros((1, 0, 3), np.uint8), name + "_sink":
                                             np.zeros((1, 0, 5), np.float32), "new": new})
    np.testing.assert_array_equal(sink, new[:, :1])
    np.testing.assert_allclose(y[:, 0], 2 * new[:, 0], rtol=1e-6)
    coded = np.clip(np.rint(new[:, 1] / scale), -7, 7) * scale
    np.testing.assert_allclose(y[:, 1], 2 * coded, rtol=1e-6)
    step = np.asarray([[[-0.5, 0.25, 7.0, 0.0, 1.0]]], np.float32)
    _, sink2, y2 = session.run(outputs, {name: present, name + "_sink": sink, "new": step})
    np.testing.assert_array_equal(sink2, sink)
    np.testing.assert_allclose(y2[:, 0], 2 * new[:, 0], rtol=1e-6)
    np.testing.assert_allclose(y2[:, 2], 2 * np.clip(np.rint(step[:, 0] / scale), -7, 7) * scale, rtol=1e-6)
