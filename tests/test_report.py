"""Every bundle's report: the stable summary in report.json, report.md with its plots, the CLI's closing
table, and --log-json progress."""

from __future__ import annotations

import json

import pytest

from qsvd_export import progress
from qsvd_export.cli import main

SMALL = ["--calib-windows", "4", "--calib-length", "64", "--grad-windows", "2"]
SUMMARY_KEYS = {"summary_version", "model", "kind", "target", "bits", "budget", "r1", "r2", "rank_per_layer",
                "kv_bytes_per_token", "weight_bytes", "perplexity", "ep_nodes", "tool_versions"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("report") / "kv50"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out), "-q", *SMALL]) == 0
    return out


def test_compressed_bundle_summary_has_every_key(compressed) -> None:  # type: ignore[no-untyped-def]
    report = json.loads((compressed / "report.json").read_text())
    summary = report["summary"]
    assert set(summary) == SUMMARY_KEYS
    assert summary["budget"] == {"kv": 0.5, "params": None} and summary["r2"] == report["r2"]
    assert summary["rank_per_layer"] == [layer["latent_rank"] for layer in report["layers"]]
    kv = summary["kv_bytes_per_token"]
    assert kv["dtype"] == "float32" and kv["dense"] == 2 * report["kv_bytes_per_token_dense_fp16"]
    assert kv["ours"] == 4 * sum(summary["rank_per_layer"]) < kv["dense"]
    placement = summary["ep_nodes"]
    assert placement["checked_on"] == "CPUExecutionProvider"
    assert placement["graphs"]["model"]["CPUExecutionProvider"] > 50
    assert summary["tool_versions"]["onnxruntime"] and summary["target"] is None and summary["bits"] == "fp32"


def test_report_md_renders_the_summary_and_both_plots(compressed) -> None:  # type: ignore[no-untyped-def]
    text = (compressed / "report.md").read_text()
    summary = json.loads((compressed / "report.json").read_text())["summary"]
    assert f"{summary['r1']:.3f} / {summary['r2']:.3f}" in text
    assert ", ".join(str(r) for r in summary["rank_per_layer"]) in text
    for plot in ("rank_allocation.png", "spectra.png"):
        assert f"]({plot})" in text
        assert (compressed / plot).read_bytes().startswith(PNG)
    spectra = json.loads((compressed / "report.json").read_text())["spectra"]
    assert set(spectra) == {"0.kv", "1.kv"}  # first, middle and last layer of two
    for entry, rank in zip(spectra.values(), summary["rank_per_layer"]):
        assert entry["sigma"][0] == 1.0 and len(entry["kept"]) == rank


def test_dense_export_ends_with_a_summary_table(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "dense"
    assert main(["export", "tiny-qwen2", "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    for label in ("bundle", "target / bits", "KV cache bytes/token", "node placement", "compile time", "report"):
        assert any(line.startswith(label) for line in printed.splitlines()), label
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["kv_bytes_per_token"]["dense"] == summary["kv_bytes_per_token"]["ours"]
    assert summary["rank_per_layer"] is None and summary["budget"] is None
    assert (out / "report.md").exists() and not (out / "rank_allocation.png").exists()


def test_cpu_target_summary_names_target_and_bits(tmp_path, bundles, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "w8a8"
    assert main([str(bundles.dense("llama") / "model.onnx"), "--target", "cpu", "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert (summary["target"], summary["bits"]) == ("cpu", "w8a8")
    assert "cpu / w8a8" in capsys.readouterr().out


def test_log_json_streams_progress_and_ends_with_the_summary(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "kv50"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out), "--log-json", *SMALL]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"info", "progress", "task_done", "summary"} <= kinds
    tasks = {e["task"] for e in events if e["event"] == "task_done"}
    assert {"calibration statistics", "whitened SVDs", "gradients", "graph passes"} <= tasks
    assert all(e["t"] >= 0 for e in events)
    assert events[-1]["event"] == "summary" and events[-1]["summary"]["r2"] <= 0.5
    assert events[-1]["timings_s"]["compress_s"] > 0


def test_log_json_errors_are_one_json_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["export", "no-such-model", "-o", str(tmp_path / "x"), "--log-json"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    error = json.loads(lines[-1])
    assert error["event"] == "error" and error["exit_code"] == 2 and "no-such-model" in error["message"]


def test_json_progress_is_rate_limited_with_an_eta(capsys) -> None:  # type: ignore[no-untyped-def]
    progress.set_mode("json")
    try:
        task = progress.bar(1000, "steps")
        for _ in range(1000):
            task.update()
        task.close()
    finally:
        progress.set_mode("bars")
    events = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    updates = [e for e in events if e["event"] == "progress"]
    assert 1 <= len(updates) <= 3  # fast steps: the final one, not a thousand lines
    assert updates[-1]["done"] == 1000 and updates[-1]["eta_s"] == 0.0
    assert events[-1] == {**events[-1], "event": "task_done", "task": "steps", "total": 1000}
