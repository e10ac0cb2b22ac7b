"""Absorbed latent attention: post-RoPE key/value latents read directly by GroupQueryAttention."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qsvd_export.compress.attention_stats import attention_statistics
from qsvd_export.compress.latent_factors import allocate_ranks, channel_scales, fit_latent, spectra
from qsvd_export.export import cache_layout_from_graph
from qsvd_export.passes.find_attention import find_attention
from qsvd_export.passes.group_query_attention import fuse_group_query_attention, match_fusable
from qsvd_export.runtimes.decode import DecoderRunner
from tests.test_samples import sample_new_ids


def _stats(bundle: Path, windows: int = 6, length: int = 24):  # type: ignore[no-untyped-def]
    model = ir.load(bundle / "model.onnx")
    blocks = [b for b in find_attention(model).blocks if match_fusable(b)[0] is None]
    ids = np.random.default_rng(1).integers(0, 256, (windows, length))
    return attention_statistics(bundle / "model.onnx", blocks, ids)


def _latent_copy(bundle: Path, out: Path, latent):  # type: ignore[no-untyped-def]
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = ir.load(bundle / "model.onnx")
    report = fuse_group_query_attention(model, latent)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    config = json.loads((out / "qsvd_config.json").read_text())
    config["cache"] = [asdict(layer) for layer in cache_layout_from_graph(model)]
    (out / "qsvd_config.json").write_text(json.dumps(config))
    return report, Counter(node.op_type for node in model.graph)


def _compare(reference: DecoderRunner, other: DecoderRunner, steps: int = 3) -> float:
    """Max |Δlogit| over a prefill of 13 tokens and ``steps`` decode steps."""
    ids = np.random.default_rng(0).integers(0, 256, (1, 13))
    a, cache_a = reference.prefill(ids)
    b, cache_b = other.prefill(ids)
    worst = float(np.abs(a - b).max())
    length = ids.shape[1]
    for token in (3, 99, 42)[:steps]:
        mask, position = np.ones((1, length + 1)), np.asarray([[length]])
        a, cache_a = reference.step(np.asarray([[token]]), mask, position, cache_a)
        b, cache_b = other.step(np.asarray([[token]]), mask, position, cache_b)
        worst = max(worst, float(np.abs(a - b).max()))
        length += 1
    return worst


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("groups", [1, 2])
def test_full_rank_float_latent_is_exact(family, groups, bundles, tmp_path):
    """At full rank the factors are invertible maps: the absorbed graph equals the dense one."""
    dense = bundles.dense(family)
    stats = _stats(dense)
    width = stats[0].kv_heads // groups * stats[0].head_dim
    latent = {i: fit_latent(s, groups, width, bits=None) for i, s in enumerate(stats)}
    report, ops = _latent_copy(dense, tmp_path / "latent", latent)
    assert report.fused == 2 and ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0
    assert _compare(DecoderRunner(dense), DecoderRunner(tmp_path / "latent")) < 1e-3


def test_int8_latent_cache_in_the_graph_io(bundles, tmp_path):
    """Reduced rank with an int8 cache: int8 cache I/O of the latent's shape, scales inside the graph,
    logits close to the float latent of the same rank, greedy tokens equal."""
    dense = bundles.dense("llama")
    stats = _stats(dense)
    ranks = allocate_ranks(stats, groups=1, budget=0.5, step=4, minimum=4)
    assert sum(2 * r for r in ranks) <= 0.5 * sum(2 * s.kv_heads * s.head_dim for s in stats)
    quantized = {i: fit_latent(s, 1, r) for i, (s, r) in enumerate(zip(stats, ranks))}
    floating = {i: replace(layer, key_scale=None, value_scale=None, cache_bits=None) for i, layer in quantized.items()}
    _latent_copy(dense, tmp_path / "int8", quantized)
    _latent_copy(dense, tmp_path / "float", floating)
    runner = DecoderRunner(tmp_path / "int8")
    cache = runner.empty_cache(1)
    assert all(a.dtype == np.int8 and a.shape[1:] == (1, 0, r) for a, r in
               zip(cache.values(), [r for r in ranks for _ in (0, 1)]))
    config = json.loads((tmp_path / "int8" / "qsvd_config.json").read_text())
    assert sum(t["shape"][3] for layer in config["cache"] for t in layer["tensors"]) == 2 * sum(ranks)
    assert _compare(DecoderRunner(tmp_path / "float"), runner) < 0.05  # int8 rounding of the latent
    prompt = [5, 6, 7, 8]
    assert DecoderRunner(tmp_path / "float").generate(prompt, 5) == runner.generate(prompt, 5)


def test_key_latent_is_fitted_in_the_query_metric(bundles):
    """The whitened key spectrum is sorted and non-negative; groups split the KV heads."""
    stats = _stats(bundles.dense("llama"))
    keys, values = spectra(stats[0], 2)
    assert keys.shape == values.shape == (2, stats[0].kv_heads // 2 * stats[0].head_dim)
    assert (np.diff(keys, axis=1) <= 1e-9).all() and (keys >= 0).all()
    with pytest.raises(ValueError, match="do not divide"):
        fit_latent(stats[0], 3, 4)


def test_channel_scales_clip_by_mse():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((20000, 3))  # at 4 bits the Gaussian optimum clips near 2.5σ, absmax sits ~4σ
    absmax, mse = channel_scales(rows, bits=4, method="absmax"), channel_scales(rows, bits=4)
    assert (mse < 0.75 * absmax).all()
    error = [((np.clip(np.round(rows / s), -8, 7) * s - rows) ** 2).mean() for s in (absmax, mse)]
    assert error[1] < error[0]


def test_int4_cache_packs_two_codes_per_byte(bundles, tmp_path):
    dense = bundles.dense("llama")
    stats = _stats(dense)
    width = stats[0].kv_heads * stats[0].head_dim
    latent = {i: fit_latent(s, 1, width, bits=4) for i, s in enumerate(stats)}
    _latent_copy(dense, tmp_path / "int4", latent)
    runner = DecoderRunner(tmp_path / "int4")
    assert all(a.dtype == np.uint8 and a.shape[1:] == (1, 0, width // 2) for a in runner.empty_cache(1).values())
    assert _compare(DecoderRunner(dense), runner) < 0.5  # 4-bit rounding of full-rank keys and values


def test_cli_int8_cache_and_absorbed_latent(tmp_path, capsys):
    from qsvd_export.cli import main

    out = tmp_path / "int8"
    assert main(["export", "tiny-llama", "--target", "cpu", "--bits", "w8a16", "--kv-bits", "8", "-o", str(out),
                 "-q"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["latent_attention"]["form"] == "dense cache" and report["latent_attention"]["cache_bits"] == 8
    config = json.loads((out / "qsvd_config.json").read_text())
    assert {t["dtype"] for layer in config["cache"] for t in layer["tensors"]} == {"int8"}
    dense_bytes = 2 * 2 * 2 * 16 * 4  # tiny-llama: 2 layers × K,V × 2 KV heads × 16 dims × fp32
    assert report["kv_bytes_per_token"] == dense_bytes // 4
    latent = tmp_path / "latent"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "--target", "cpu", "--bits", "w8a16",
                 "--kv-form", "absorbed", "--calib-windows", "2", "-o", str(latent), "-q"]) == 0, capsys.readouterr().err
    report = json.loads((latent / "report.json").read_text())
    assert report["stage"] == "latent-attention" and report["kv_bytes_per_token"] <= dense_bytes // 8
    ids = [200, 13, 77, 5, 190, 33]
    for bundle in (out, latent):  # the standalone reference loop runs int8 caches as the runtime does
        eos = json.loads((bundle / "qsvd_config.json").read_text())["generation"]["eos_token_ids"]
        assert sample_new_ids(bundle, ids, 5) == DecoderRunner(bundle).generate(ids, 5, eos)


@pytest.mark.parametrize("argv, message", [
    (["export", "tiny-llama", "--kv-bits", "8"], "need --target cpu"),
    (["export", "tiny-gemma3", "--target", "cpu", "--kv-bits", "8"], "plain causal decoders only"),
    (["compress", "tiny-llama", "--budget", "kv=0.5", "--target", "cpu", "--latent-groups", "2"], "--kv-form absorbed"),
    (["compress", "tiny-llama", "--budget", "kv=0.5", "--kv-bits", "8"], "needs --target cpu"),
    (["compress", "tiny-llama", "--budget", "params=0.8,kv=0.5", "--target", "cpu", "--kv-form", "absorbed"],
     "KV-only budget"),
])
def test_cache_options_are_refused_by_name(argv, message, tmp_path, capsys):
    from qsvd_export.cli import main

    assert main([*argv, "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
