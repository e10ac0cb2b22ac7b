"""--mobile: ORT-format graphs + the reduced-build operator config, verified, deterministic, refused when too big."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from qsvd_export.bundle import load_bundle_config
from qsvd_export.cli import main
from qsvd_export.targets.mobile import OPERATORS_CONFIG, canonical_ort_bytes, convert_to_ort, ort_nodes

NPU_SMALL = ["--target", "npu", "--context-length", "48", "--prefill-length", "8", "--no-verify"]


def _compile(bundles, tmp_path, capsys, *args):
    out = tmp_path / "mobile"
    code = main([str(bundles.dense("llama") / "model.onnx"), "-o", str(out), "--mobile", "-q", *args])
    assert code == 0, capsys.readouterr().err
    return out, load_bundle_config(out), json.loads((out / "report.json").read_text())["mobile"]


def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _prefill(session, config, ids):
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for layer in config.cache:
        for t in layer.tensors:
            feed[t.input] = np.zeros([1 if d == "batch_size" else 0 if d == "past_sequence_length" else d
                                      for d in t.shape], dtype=np.float16 if t.dtype == "float16" else np.float32)
    return session.run(["logits"], feed)[0]


def test_fp32_bundle_gets_verified_self_contained_ort_graph(bundles, tmp_path, capsys):
    assert "ort_filename" not in (bundles.dense("llama") / "qsvd_config.json").read_text()  # only with --mobile
    out, config, report = _compile(bundles, tmp_path, capsys)
    spec = config.graph("model")
    assert spec.ort_filename == "model.ort" and (out / "model.ort").is_file()
    assert report["optimization"] == "basic" and report["graphs"]["model"]["bytes"] == (out / "model.ort").stat().st_size
    check = report["verification"]["graphs"]["model"]
    assert check["steps"] == 2 and check["max_abs_diff"] <= 1e-5 and check["max_abs_diff_vs_all_optimizations"] <= 1e-5
    lines = (out / OPERATORS_CONFIG).read_text().splitlines()
    assert "# - model.ort" in lines and any(line.startswith("ai.onnx;13;") and "MatMul" in line for line in lines)
    assert str(tmp_path) not in "\n".join(lines)  # no temporary paths: the file is reproducible
    # the .ort embeds its weights: it runs alone, away from model.onnx.data, and matches the ONNX graph
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "model.ort", alone / "model.ort")
    ids = np.asarray([list(b"Hello, mobile!")], dtype=np.int64)
    a, b = _prefill(_session(out / "model.onnx"), config, ids), _prefill(_session(alone / "model.ort"), config, ids)
    assert np.abs(a - b).max() <= 1e-5


def test_cpu_target_keeps_matmulnbits_in_the_ort_graph(bundles, tmp_path, capsys):
    out, config, report = _compile(bundles, tmp_path, capsys, "--target", "cpu", "--bits", "w4a8")
    assert ("com.microsoft", 1, "MatMulNBits") in ort_nodes(out / "model.ort")
    contrib = next(line for line in (out / OPERATORS_CONFIG).read_text().splitlines()
                   if line.startswith("com.microsoft;1;"))
    assert {"MatMulNBits", "GatherBlockQuantized"} <= set(contrib.split(";", 2)[2].split(","))  # + the 8-bit embedding
    assert report["verification"]["max_abs_diff"] <= 1e-5


def test_npu_static_qdq_graphs_convert_unoptimized(bundles, tmp_path, capsys):
    out, config, report = _compile(bundles, tmp_path, capsys, *NPU_SMALL)
    assert [(g.role, g.ort_filename) for g in config.graphs] == [("prefill", "prefill.ort"), ("decode", "decode.ort")]
    assert report["optimization"] == "none"  # the QDQ graph QNN compiles stays as calibrated
    assert {g["steps"] for g in report["verification"]["graphs"].values()} == {1}
    assert report["verification"]["max_abs_diff"] <= 1e-5
    assert "DequantizeLinear" in (out / OPERATORS_CONFIG).read_text()


def test_ort_bytes_are_identical_across_processes(bundles, tmp_path):
    """onnxruntime orders a table of the file by a per-process hash seed; canonical_ort_bytes sorts it."""
    graph = bundles.dense("llama") / "model.onnx"
    script = "import sys; from pathlib import Path; from qsvd_export.targets.mobile import convert_to_ort; " \
             "convert_to_ort(Path(sys.argv[1]), Path(sys.argv[2]))"
    here, there = tmp_path / "here.ort", tmp_path / "there.ort"
    convert_to_ort(graph, here)
    subprocess.run([sys.executable, "-c", script, str(graph), str(there)], check=True, timeout=120)
    a, b = here.read_bytes(), there.read_bytes()
    assert a == b
    assert canonical_ort_bytes(a) == a  # idempotent


def test_graph_too_big_for_the_ort_format_is_a_usage_error(bundles, tmp_path, capsys, monkeypatch):
    import qsvd_export.targets.mobile as mobile

    monkeypatch.setattr(mobile, "MAX_ORT_BYTES", 100_000)
    out = tmp_path / "out"
    code = main([str(bundles.dense("llama") / "model.onnx"), "-o", str(out), "--mobile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("qsvd-export: error: --mobile: model.onnx holds")
    assert "2 GiB" in err[-1] and list(tmp_path.iterdir()) == []


def test_parity_failure_is_a_runtime_failure_and_leaves_no_output(bundles, tmp_path, capsys, monkeypatch):
    import qsvd_export.targets.mobile as mobile

    monkeypatch.setattr(mobile, "TOLERANCE", -1.0)
    out = tmp_path / "out"
    code = main([str(bundles.dense("llama") / "model.onnx"), "-o", str(out), "--mobile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and "model.ort differs from model.onnx" in err[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,builder", [
    (["export", "tiny-llama"], ("dense", "build_dense_bundle")),
    (["compress", "tiny-llama", "--budget", "kv=0.5"], ("compressed", "build_compressed_bundle")),
])
def test_export_and_compress_pass_mobile_through(command, builder, tmp_path, monkeypatch):
    import importlib

    seen = {}

    def capture(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(importlib.import_module(f"qsvd_export.build.{builder[0]}"), builder[1], capture)
    assert main([*command, "-o", str(tmp_path / "out"), "--mobile", "-q"]) == 130
    assert seen["mobile"] is True
