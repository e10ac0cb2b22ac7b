"""Shared fixtures: tiny models are exported once per session and reused by every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DECODER_FAMILIES = ["llama", "qwen2", "gemma3", "gpt2"]
ENCODER_FAMILIES = ["bert"]
VISION_FAMILIES = ["vit", "dinov2"]


class BundleCache:
    """Builds each tiny dense bundle at most once per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def dense(self, family: str) -> Path:
        if family not in self._built:
            from qsvd_export.build.dense import build_dense_bundle

            out = self.root / f"dense-{family}"
            build_dense_bundle(f"tiny-{family}", out)
            self._built[family] = out
        return self._built[family]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> BundleCache:
    return BundleCache(tmp_path_factory.mktemp("bundles"))
