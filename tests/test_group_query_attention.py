"""cpu target: dense-cache attention fused into com.microsoft.GroupQueryAttention."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from qsvd_export.cli import main
from qsvd_export.passes.group_query_attention import fuse_group_query_attention
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.targets import plain_causal


def _fused_copy(bundle, out):  # type: ignore[no-untyped-def]
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = ir.load(bundle / "model.onnx")
    report = fuse_group_query_attention(model)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    return report, Counter(node.op_type for node in model.graph)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_graph_equals_the_decomposed_one_in_prefill_and_decode(family, bundles, tmp_path):
    dense = bundles.dense(family)
    report, ops = _fused_copy(dense, tmp_path / "fused")
    assert report.fused == 2 and not report.skipped
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0 and ops["Expand"] == 0
    reference, fused = DecoderRunner(dense), DecoderRunner(tmp_path / "fused")
    assert reference.output_names == fused.output_names  # present.{i}.key/value keep their names
    ids = np.random.default_rng(0).integers(0, 256, (1, 17))
    a, cache_a = reference.prefill(ids)
    b, cache_b = fused.prefill(ids)
    assert np.abs(a - b).max() < 1e-5
    length = ids.shape[1]
    for token in (3, 99, 42):
        mask, position = np.ones((1, length + 1)), np.asarray([[length]])
        a, cache_a = reference.step(np.asarray([[token]]), mask, position, cache_a)
        b, cache_b = fused.step(np.asarray([[token]]), mask, position, cache_b)
        assert np.abs(a - b).max() < 1e-5
        length += 1
    assert reference.generate([5, 6, 7], 6) == fused.generate([5, 6, 7], 6)
    from tests.test_latent_cache_8bit import assert_chunked_prefill_equals_one_forward

    assert_chunked_prefill_equals_one_forward(tmp_path / "fused")  # GroupQueryAttention over a past and new tokens
    assert fused.prefill_chunk is None and reference.prefill_chunk == 512  # fused attention: one forward


def test_latent_layers_are_left_alone_with_the_reason(tmp_path, capsys):
    out = tmp_path / "latent"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out), "--calib-windows", "4",
                 "--calib-length", "32", "--grad-windows", "2", "-q"]) == 0, capsys.readouterr().err
    report, ops = _fused_copy(out, tmp_path / "fused")
    assert report.fused == 0 and ops["GroupQueryAttention"] == 0
    assert len(report.skipped) == 2  # each Softmax is named with the reason


def test_cpu_target_fuses_plain_causal_models_only(tmp_path, capsys):
    assert plain_causal("llama") and plain_causal("qwen2") and not plain_causal("gemma3")
    assert not plain_causal("qwen2", type("Config", (), {"use_sliding_window": True})())
    out = tmp_path / "cpu"
    assert main(["export", "tiny-llama", "--target", "cpu", "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    attention = json.loads((out / "report.json").read_text())["target"]["attention"]
    assert attention["group_query_attention"] == 2 and "right padding only" in attention["attention_mask"]
    assert "right padding only" in (out / "README.md").read_text()  # the I/O contract users read
    gemma = tmp_path / "gemma"  # sliding-window layers: the mask is not GroupQueryAttention's
    assert main(["export", "tiny-gemma3", "--target", "cpu", "-o", str(gemma), "-q"]) == 0
    assert "attention" not in json.loads((gemma / "report.json").read_text())["target"]
