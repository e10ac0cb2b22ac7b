"""Bundle config round-trip, atomic output and the data helpers."""

from __future__ import annotations

import numpy as np
import pytest

from qsvd_export.bundle import (
    BundleConfig, CacheTensor, GraphSpec, LayerCache, atomic_output_dir, load_bundle_config,
)
from qsvd_export.data import read_text, token_windows
from qsvd_export.errors import BadInputError, UsageError


def _config() -> BundleConfig:
    dense = LayerCache(0, "dense", [
        CacheTensor("past_key_values.0.key", "present.0.key", ["batch_size", 3, "past_sequence_length", 64], "float32", 2),
        CacheTensor("past_key_values.0.value", "present.0.value", ["batch_size", 3, "past_sequence_length", 64], "float32", 2),
    ])
    latent = LayerCache(1, "latent", [
        CacheTensor("past_key_values.1.latent", "present.1.latent", ["batch_size", "past_sequence_length", 96], "uint16", 1),
    ], rank=96)
    return BundleConfig("m", "llama", "decoder", [GraphSpec("model", "model.onnx", ["input_ids"], ["logits"])],
                        cache=[dense, latent])


def test_config_round_trip_and_kv_bytes(tmp_path):
    config = _config()
    (tmp_path / "qsvd_config.json").write_text(config.to_json())
    loaded = load_bundle_config(tmp_path)
    assert loaded == config
    assert loaded.cache[0].bytes_per_token() == 2 * 3 * 64 * 4
    assert loaded.cache[1].bytes_per_token() == 96 * 2


def test_malformed_config_is_a_bad_input(tmp_path):
    (tmp_path / "qsvd_config.json").write_text("{not json")
    with pytest.raises(BadInputError, match="malformed bundle config"):
        load_bundle_config(tmp_path)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "half.onnx").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_on_interrupt_keeps_old_bundle(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old.txt").read_text() == "old"


def test_atomic_output_replaces_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_non_empty_output_refused_without_overwrite(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        with atomic_output_dir(tmp_path, overwrite=False):
            pass


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_token_windows_shape_and_too_short_text():
    text = " ".join(["word"] * 100)
    windows = token_windows(_WordTokenizer(), text, length=10, count=3)
    assert windows.shape == (3, 10) and windows.dtype == np.int64
    with pytest.raises(BadInputError, match="only 10 windows of 10; 11 requested"):
        token_windows(_WordTokenizer(), text, length=10, count=11)


def test_bundled_corpora_resolve():
    assert "Alkali metal" in read_text("wiki_eval")[:100]
    with pytest.raises(BadInputError, match="not found"):
        read_text("no_such_corpus")
