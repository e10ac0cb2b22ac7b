"""gpu target: fp16 activations/cache with rotary angles kept fp32, checked on the CPU EP (ONNX Runtime
casts the fp16 nodes it has no CPU kernel for); the CUDA EP itself is checked by benchmarks.gpu_check."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from qsvd_export.bundle import load_bundle_config
from qsvd_export.cli import main
from qsvd_export.runtimes.decode import DecoderRunner

from conftest import DECODER_FAMILIES

SMALL = ["--calib-windows", "4", "--calib-length", "64", "--grad-windows", "2", "-q"]


def _max_logit_gap(a: DecoderRunner, b: DecoderRunner, prompt: list[int], first_position: int = 0) -> float:
    """Max |Δlogit| over a prefill of ``prompt`` at positions ``first_position…`` and three decode steps."""
    ids = np.asarray([prompt])
    mask = np.ones_like(ids)
    positions = np.arange(first_position, first_position + len(prompt))[None]
    la, ca = a.step(ids, mask, positions, a.empty_cache(1))
    lb, cb = b.step(ids, mask, positions, b.empty_cache(1))
    gap = float(np.abs(la - lb).max())
    length = len(prompt)
    for token in (5, 77, 200):
        step = (np.asarray([[token]]), np.ones((1, length + 1)), np.asarray([[first_position + length]]))
        la, ca = a.step(*step, ca)
        lb, cb = b.step(*step, cb)
        gap = max(gap, float(np.abs(la - lb).max()))
        length += 1
    assert la.dtype == np.float32
    return gap


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_fp16_decoder_matches_fp32_with_a_half_size_cache(family, bundles, tmp_path):
    dense = bundles.dense(family)
    out = tmp_path / "gpu"
    assert main([str(dense / "model.onnx"), "--target", "gpu", "--bits", "fp", "-o", str(out), "-q"]) == 0
    config = load_bundle_config(out)
    assert {t.dtype for layer in config.cache for t in layer.tensors} == {"float16"}
    assert config.kv_bytes_per_token() * 2 == load_bundle_config(dense).kv_bytes_per_token()
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 20)]
    assert _max_logit_gap(DecoderRunner(out), DecoderRunner(dense), prompt) < 5e-3
    report = json.loads((out / "report.json").read_text())["target"]
    assert report["float16"]["activations"] == "float16"


def _cosines(graph_path, positions: np.ndarray) -> np.ndarray:
    """The rotary ``Cos`` output of a decoder graph for ``positions`` [1, seq] (empty cache)."""
    import onnxruntime as ort

    model = ir.load(graph_path)
    cos = next(n for n in model.graph if n.op_type == "Cos").outputs[0]
    model.graph.outputs.append(cos)
    ir.external_data.load_to_model(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.zeros_like(positions), "attention_mask": np.ones_like(positions), "position_ids": positions}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            shape = [1 if d == "batch_size" else 0 if d == "past_sequence_length" else d for d in value.shape]
            feed[value.name] = np.zeros(shape, np.float16 if "float16" in value.type else np.float32)
    return session.run([cos.name], feed)[0]


def test_rotary_angles_stay_fp32_at_long_positions(bundles, tmp_path):
    """Around position 2000, fp16 angles are off by up to 1 rad; fp32 angles keep cos within fp32 noise."""
    out, dense = tmp_path / "gpu", bundles.dense("llama")
    assert main([str(dense / "model.onnx"), "--target", "gpu", "--bits", "fp", "-o", str(out), "-q"]) == 0
    model = ir.load(out / "model.onnx")
    angles = [n for n in model.graph if n.op_type in ("Cos", "Sin")]
    assert angles and all(n.inputs[0].dtype == ir.DataType.FLOAT for n in angles)
    positions = np.arange(2000, 2016)[None]
    assert np.abs(_cosines(out / "model.onnx", positions) - _cosines(dense / "model.onnx", positions)).max() < 1e-4
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 256, 12)]
    assert _max_logit_gap(DecoderRunner(out), DecoderRunner(dense), prompt, first_position=1500) < 5e-3


def test_gpu_w4a16_is_the_cpu_w4a16_graph_in_fp16(bundles, tmp_path, monkeypatch):
    """Same MatMulNBits weights; the gpu graph keeps a float embedding (the cpu target's 8-bit
    GatherBlockQuantized is not verified on CUDA), so the cpu reference is built without it here."""
    import dataclasses

    from qsvd_export import targets

    gpu, cpu, dense = tmp_path / "gpu", tmp_path / "cpu", bundles.dense("qwen2") / "model.onnx"
    assert main([str(dense), "--target", "gpu", "-o", str(gpu), "-q"]) == 0
    monkeypatch.setitem(targets.TARGETS, "cpu", dataclasses.replace(targets.TARGETS["cpu"], quantize_embedding=False))
    assert main([str(dense), "--target", "cpu", "--bits", "w4a16", "-o", str(cpu), "-q"]) == 0
    report = json.loads((gpu / "report.json").read_text())["target"]
    assert report["bits"] == "w4a16" and report["quantized_matmuls"] > 0
    model = ir.load(gpu / "model.onnx")
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == report["quantized_matmuls"]
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT16 and n.inputs[2].dtype == ir.DataType.FLOAT16 for n in nbits)
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 256, 16)]
    assert _max_logit_gap(DecoderRunner(gpu), DecoderRunner(cpu), prompt) < 5e-3


def test_latent_bundle_converts_with_its_latent_cache(tmp_path):
    fp32, gpu = tmp_path / "fp32", tmp_path / "gpu"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(fp32), *SMALL]) == 0
    assert main([str(fp32 / "model.onnx"), "--target", "gpu", "--bits", "fp", "-o", str(gpu), "-q"]) == 0
    config = load_bundle_config(gpu)
    assert {layer.kind for layer in config.cache} == {"latent"}
    assert {t.dtype for layer in config.cache for t in layer.tensors} == {"float16"}
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 256, 16)]
    assert _max_logit_gap(DecoderRunner(gpu), DecoderRunner(fp32), prompt) < 5e-3
