"""benchmarks.bundle_perplexity: perplexity and KV bytes of bundles on one text, ratios against the first."""

from __future__ import annotations

import json

from benchmarks.bundle_perplexity import main
from qsvd_export.bundle import load_bundle_config
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.metrics import perplexity


def test_rows_are_measured_and_written(bundles, tmp_path, capsys):
    dense, other = bundles.dense("llama"), bundles.dense("qwen2")
    out = tmp_path / "sub" / "ppl.json"
    assert main([str(dense), str(other), "--text", "wiki_eval", "--windows", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    first, second = result["rows"]
    assert result["windows"] == 2 and first["ratio_to_first"] == 1.0
    assert second["ratio_to_first"] == round(second["perplexity"] / first["perplexity"], 4)
    assert first["kv_bytes_per_token"] == load_bundle_config(dense).kv_bytes_per_token()
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.bundle import bundle_tokenizer

    rows = token_windows(bundle_tokenizer(dense), read_text("wiki_eval"), 512, 2, source="wiki_eval")
    assert first["perplexity"] == round(perplexity(DecoderRunner(dense).window_nlls(rows)), 4)


def test_window_length_is_an_option(bundles, tmp_path, capsys):
    dense = bundles.dense("llama")
    assert main([str(dense), "--text", "wiki_eval", "--windows", "1", "--length", "96"]) == 0
    result = json.loads(capsys.readouterr().out)
    from qsvd_export.bundle import bundle_tokenizer
    from qsvd_export.data import read_text, token_windows

    rows = token_windows(bundle_tokenizer(dense), read_text("wiki_eval"), 96, 1, source="wiki_eval")
    assert result["length"] == 96 and result["windows"] == 1
    assert result["rows"][0]["perplexity"] == round(perplexity(DecoderRunner(dense).window_nlls(rows)), 4)
