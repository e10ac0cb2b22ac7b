"""Graph-only plans (`qsvd-export model.onnx --budget ...`): no torch model, calibration in ONNX Runtime."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from qsvd_export.cli import main
from qsvd_export.plan import apply_plan, load_plan
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.zoo import load_model

SMALL = ["--calib-windows", "4", "--calib-length", "64", "-q"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])  # plain, q/k/v bias, fused c_attn
def test_graph_only_plan_gives_a_latent_graph_equal_to_torch_with_that_plan(family, bundles, tmp_path):
    out = tmp_path / "kv50"
    assert main([str(bundles.dense(family) / "model.onnx"), "--budget", "kv=0.5", "-o", str(out), *SMALL]) == 0
    plan = load_plan(out)
    assert plan.r2 <= 0.5 and plan.method["importance"] == "energy"
    report = json.loads((out / "report.json").read_text())
    assert all(layer["cache"] == "latent" for layer in report["graph_stage"]["layers"])
    model = apply_plan(copy.deepcopy(load_model(f"tiny-{family}").model), plan)
    runner = DecoderRunner(out)
    ids = np.random.default_rng(5).integers(0, 256, (1, 12))
    logits, cache = runner.prefill(ids)
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids), use_cache=True)
    assert np.abs(reference.logits.numpy() - logits).max() <= 1e-4
    logits, _ = runner.step(np.asarray([[7]]), np.ones((1, 13)), np.asarray([[12]]), cache)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([[7]]), past_key_values=reference.past_key_values, use_cache=True)
    assert np.abs(reference.logits.numpy() - logits).max() <= 1e-4


def test_budget_needs_the_bundle_and_excludes_a_plan(bundles, tmp_path, capsys):
    dense = bundles.dense("llama")
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(dense / name, lone / name)
    assert main([str(lone / "model.onnx"), "--budget", "kv=0.5", "-o", str(tmp_path / "a"), *SMALL]) == 2
    assert "needs its bundle beside model.onnx" in capsys.readouterr().err
    assert main([str(dense / "model.onnx"), "--budget", "kv=0.5", "--plan", str(dense), "-o", str(tmp_path / "b"),
                 *SMALL]) == 2
    assert "cannot be combined with --plan" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
