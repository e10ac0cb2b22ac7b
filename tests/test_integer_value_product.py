"""integer_value_product: the attention-weighted latent as one integer product on the cached uint8 codes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsvd_export.passes.contracts import PassPreconditionError, run_passes
from qsvd_export.passes.fold_latent_scales import FoldLatentScalesPass
from qsvd_export.passes.integer_value_product import FINE_STEP, IntegerValueProductPass, weighted_latents
from qsvd_export.passes.latent_sink import KeepLatentSinkPass
from qsvd_export.passes.quantize_latent_cache import QuantizeLatentCachePass

RANK, HEADS = 24, 3
NAME = "past_key_values.0.latent"
RNG = np.random.default_rng(11)


def _attention_graph(softmax: bool = True, axis: int = 1) -> onnx.ModelProto:
    """A float latent cache [B, T, r] and ``weighted = Softmax(scores) · Unsqueeze(present, 1)`` [B, H, S, r]
    (scores [B, H, S, T]), plus ``keys = present · W`` (another reader of the latent)."""
    probabilities = "probs" if softmax else "scores"
    nodes = [helper.make_node("Concat", [NAME, "new"], ["present.0.latent"], axis=1),
             *([helper.make_node("Softmax", ["scores"], ["probs"], axis=-1)] if softmax else []),
             helper.make_node("Unsqueeze", ["present.0.latent", "one"], ["latent4"]),
             helper.make_node("MatMul", [probabilities, "latent4"], ["weighted"]),
             helper.make_node("MatMul", ["present.0.latent", "w"], ["keys"])]
    tensors = [numpy_helper.from_array(np.asarray([axis], np.int64), "one"),
               numpy_helper.from_array(RNG.standard_normal((RANK, 8)).astype(np.float32), "w")]
    latent = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", None, RANK])  # noqa: E731
    graph = helper.make_graph(
        nodes, "g", [latent(NAME), latent("new"),
                     helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", HEADS, None, None])],
        [latent("present.0.latent"), helper.make_tensor_value_info("weighted", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("keys", TensorProto.FLOAT, None)], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _coded(bits: int, scale: np.ndarray, softmax: bool = True, proto: onnx.ModelProto | None = None) -> ir.Model:
    model = ir.from_proto(proto or _attention_graph(softmax))
    run_passes(model, [QuantizeLatentCachePass({NAME: scale}, bits=bits), FoldLatentScalesPass(),
                       *([KeepLatentSinkPass([NAME])] if bits == 4 else [])])
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(model: ir.Model, batch: int, past: int, seq: int, temperature: float) -> dict[str, np.ndarray]:
    """A cache of ``past`` coded tokens (written by the graph itself) and ``seq`` new ones; scores whose spread
    ``temperature`` sets (large: peaked rows, small: diffuse rows)."""
    session = _session(model)
    empty = {i.name: np.zeros([batch if d == "batch" else 0 if not isinstance(d, int) else d for d in i.shape],
                              dtype=np.uint8 if i.type == "tensor(uint8)" else np.float32)
             for i in session.get_inputs() if i.name.startswith("past_key_values")}
    first = {**empty, "new": RNG.standard_normal((batch, past, RANK)).astype(np.float32),
             "scores": RNG.standard_normal((batch, HEADS, past, past)).astype(np.float32)}
    outputs = [o.name for o in session.get_outputs()]
    cache = {name.replace("present.", "past_key_values.", 1): value
             for name, value in zip(outputs, session.run(outputs, first)) if name.startswith("present.")}
    scores = temperature * RNG.standard_normal((batch, HEADS, seq, past + seq)).astype(np.float32)
    return {**cache, "new": RNG.standard_normal((batch, seq, RANK)).astype(np.float32), "scores": scores}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("batch, past, seq, temperature", [(1, 300, 1, 0.3), (2, 40, 5, 8.0), (1, 1, 1, 1.0)])
def test_integer_product_is_within_its_stated_bound(bits, batch, past, seq, temperature):
    scale = (RNG.random(RANK) * 0.05 + 0.01).astype(np.float32)
    proto = _attention_graph()
    folded = _coded(bits, scale, proto=proto)
    feeds = _feeds(folded, batch, past, seq, temperature)
    expected_weighted, expected_keys, expected_present = _session(folded).run(
        ["weighted", "keys", "present.0.latent"], feeds)
    model = _coded(bits, scale, proto=proto)
    run_passes(model, [IntegerValueProductPass()])
    weighted, keys, present = _session(model).run(["weighted", "keys", "present.0.latent"], feeds)
    np.testing.assert_array_equal(present, expected_present)
    np.testing.assert_array_equal(keys, expected_keys)
    # |Δ| ≤ rowmax / (2 · 65025) · Σ_t |code_t − z| · s_j, plus float rounding
    probabilities = np.exp(feeds["scores"] - feeds["scores"].max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    codes = _session_codes(model, feeds, bits)
    bound = probabilities.max(-1, keepdims=True) / (2 * FINE_STEP) * np.abs(codes).sum(1)[:, None, None, :] * scale
    error = np.abs(weighted - expected_weighted)
    assert np.all(error <= bound + 1e-5 * np.abs(expected_weighted).max()), float((error - bound).max())
    assert error.max() > 0  # the probabilities really went through the integer grids


def _session_codes(model: ir.Model, feeds: dict, bits: int) -> np.ndarray:
    """The codes − zero point [B, T, r] the cache holds after this call (row 0 of a 4-bit cache: its coded value,
    which the sink's correction replaces after the product)."""
    present = _session(model).run(["present.0.latent"], feeds)[0].astype(np.int32)
    if bits == 8:
        return present - 128
    unpacked = np.concatenate([present & 15, present >> 4], axis=2)[..., :RANK]
    return unpacked - 8


@pytest.mark.parametrize("bits", [8, 4])
def test_the_product_reads_the_stored_codes_and_no_float_copy(bits):
    model = _coded(bits, np.full(RANK, 0.02, np.float32))
    run_passes(model, [IntegerValueProductPass()])
    proto = ir.to_proto(model)
    integer = [n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat"]
    product = [n for n in integer if "integer/product" in n.name]
    assert len(product) == 1
    stored = product[0].input[1]
    assert stored == "present.0.latent" if bits == 8 else stored != "present.0.latent"
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and "latent4" in n.input]
    assert not weighted_latents(model.graph)


def test_probabilities_that_are_not_a_softmax_are_left_alone():
    model = _coded(8, np.full(RANK, 0.02, np.float32), softmax=False)
    assert not weighted_latents(model.graph)
    with pytest.raises(PassPreconditionError, match="no Softmax-weighted product over a uint8 latent cache"):
        run_passes(model, [IntegerValueProductPass()])


def test_an_opset_12_softmax_is_not_read_as_rows():
    """Before opset 13 Softmax normalizes over flattened trailing axes (default axis 1): not a last-axis row."""
    model = _coded(8, np.full(RANK, 0.02, np.float32))
    assert weighted_latents(model.graph)
    model.graph.opset_imports[""] = 12
    assert not weighted_latents(model.graph)


def test_an_unsqueeze_before_the_batch_axis_is_not_a_batched_product():
    """Unsqueeze(codes, 0) broadcasts the codes' batch against P's heads: not a product batched over B."""
    model = _coded(8, np.full(RANK, 0.02, np.float32), proto=_attention_graph(axis=0))
    assert not weighted_latents(model.graph)
