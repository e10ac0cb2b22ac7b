"""Torch stage on tiny configs: structure, exactness, budget accounting, determinism, plan round-trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qsvd_export.compress.allocate import LayerScores, allocate_qsvd, allocate_uniform
from qsvd_export.compress.budget import Budget, LayerDims, parse_budget, ratios
from qsvd_export.compress.compressor import compress_model
from qsvd_export.compress.options import CompressOptions
from qsvd_export.compress.rotation import random_orthogonal, randomized_hadamard
from qsvd_export.errors import BadInputError, UsageError
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.plan.io import load_plan, save_plan
from qsvd_export.zoo import load_model

WINDOWS = np.random.default_rng(0).integers(0, 256, (8, 24))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma3"])
@pytest.mark.parametrize("whitening", ["cholesky", "absmean"])
def test_full_rank_joint_qkv_reconstructs_exactly(family, whitening):
    loaded = load_model(f"tiny-{family}")
    options = CompressOptions(parse_budget("kv=1.0"), allocation="uniform", grouping="qkv", whitening=whitening,
                              grad_windows=0, beta=0.3, rotation="orthogonal")
    plan = compress_model(loaded, options, windows=WINDOWS)
    assert all(g.rank == layer.dims["e"] for layer in plan.layers for g in layer.groups)
    compressed = apply_plan(copy.deepcopy(loaded.model), plan)
    assert torch.allclose(_logits(compressed, WINDOWS[:2]), _logits(loaded.model, WINDOWS[:2]), atol=1e-4)


def test_bert_full_rank_with_biases_is_exact():
    loaded = load_model("tiny-bert")
    plan = compress_model(loaded, CompressOptions(parse_budget("params=1.0"), allocation="uniform", grouping="qkv",
                                                  rotation="none"), windows=WINDOWS)
    # E = 64: joint QKV [192, 64] at rank 64 costs 64 * (64 + 192) = 1.33x dense, so params=1.0 caps the rank
    assert plan.r1 <= 1.0
    kv_plan = compress_model(loaded, CompressOptions(parse_budget("kv=1.0"), allocation="uniform", grouping="qkv",
                                                     rotation="none"), windows=WINDOWS)
    compressed = apply_plan(copy.deepcopy(loaded.model), kv_plan)
    ids = torch.from_numpy(WINDOWS[:2])
    with torch.no_grad():
        a = compressed(input_ids=ids).last_hidden_state
        b = loaded.model(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("budget", ["kv=0.5", "params=0.8,kv=0.75", "params=0.7"])
@pytest.mark.parametrize("allocation,grouping", [("qsvd", "auto"), ("qsvd", "qkv"), ("uniform", "kv"),
                                                 ("uniform", "separate"), ("fisher", "kv")])
def test_budget_accounting_is_exact_and_respected(budget, allocation, grouping):
    loaded = load_model("tiny-llama")
    b = parse_budget(budget)
    # every combination here is feasible on tiny-llama (E = 64, q = 64, k = v = 32, min rank 2): no refusal
    # is accepted; the refusals have their own test below
    plan = compress_model(loaded, CompressOptions(b, allocation=allocation, grouping=grouping, grad_windows=4,
                                                  min_rank=2), windows=WINDOWS)
    dims = [LayerDims(**layer.dims) for layer in plan.layers]
    r1, r2 = ratios(dims, [{g.members: g.rank for g in layer.groups} for layer in plan.layers])
    assert (plan.r1, plan.r2) == (round(r1, 6), round(r2, 6))
    assert b.kv is None or r2 <= b.kv + 1e-9
    assert b.params is None or r1 <= b.params + 1e-9
    # hand count for layer 0: E = 64, q = 64, k = v = 32
    params, width = plan.layers[0].cost()
    expected_params = sum(g.rank * (64 + sum({"q": 64, "k": 32, "v": 32}[m] for m in g.members))
                          for g in plan.layers[0].groups)
    covered = "".join(g.members for g in plan.layers[0].groups)
    expected_params += sum(64 * {"q": 64, "k": 32, "v": 32}[m] for m in "qkv" if m not in covered)
    assert params == expected_params
    assert width == plan.layers[0].latent_rank + sum(32 for m in "kv" if m not in covered)


@pytest.mark.parametrize("budget,grouping", [("params=0.4", "kv"), ("kv=0.01", "qkv")])
def test_budgets_below_the_smallest_ranks_are_refused(budget, grouping):
    """Hand count on tiny-llama: grouping kv keeps q dense (64·64 = 4,096 of 8,192 params), so params=0.4
    cannot be met; kv=0.01 is below one rank-2 joint latent (2 of the 64 K+V widths: 0.031)."""
    loaded = load_model("tiny-llama")
    with pytest.raises(UsageError, match=f"budget {budget} cannot be met"):
        compress_model(loaded, CompressOptions(parse_budget(budget), allocation="uniform", grouping=grouping,
                                               grad_windows=4, min_rank=2), windows=WINDOWS)


def test_same_seed_gives_identical_plan_bytes(tmp_path):
    loaded = load_model("tiny-qwen2")
    options = CompressOptions(parse_budget("kv=0.5"), grad_windows=4, bits="w8a8")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_plan(compress_model(loaded, options, windows=WINDOWS), tmp_path / name)
    for file in ("plan.json", "plan.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_plan_round_trip_and_validation(tmp_path):
    loaded = load_model("tiny-llama")
    plan = compress_model(loaded, CompressOptions(parse_budget("kv=0.5"), grad_windows=4), windows=WINDOWS)
    save_plan(plan, tmp_path)
    again = load_plan(tmp_path)
    assert again == plan
    assert sorted(again.tensors) == sorted(plan.tensors)
    assert all(torch.equal(again.tensors[k], plan.tensors[k]) for k in plan.tensors)
    a = apply_plan(copy.deepcopy(loaded.model), plan)
    b = apply_plan(copy.deepcopy(loaded.model), again)
    assert torch.equal(_logits(a, WINDOWS[:1]), _logits(b, WINDOWS[:1]))
    with pytest.raises(BadInputError, match="layers"):
        apply_plan(copy.deepcopy(load_model("tiny-gemma3").model), again)
    (tmp_path / "plan.json").write_text("{broken")
    with pytest.raises(BadInputError, match="malformed plan"):
        load_plan(tmp_path)


def test_invalid_budgets_are_usage_errors():
    for text in ("kv=0", "kv=1.5", "kv=abc", "foo=0.5", "kv=0.5,kv=0.4", "0.5"):
        with pytest.raises(UsageError):
            parse_budget(text)
    assert parse_budget("params=0.8,kv=0.75") == Budget(kv=0.75, params=0.8)


def _synthetic_layer(q_importance: float, kv_importance: float) -> LayerScores:
    dims = LayerDims(e=16, q=16, k=8, v=8)
    decay = np.exp(-np.arange(16) / 4)
    return LayerScores(dims, {
        "qkv": (q_importance + kv_importance) * decay, "kv": kv_importance * decay, "q": q_importance * decay,
    }, {"qkv": 1.0, "kv": 1.0, "q": 1.0})


def test_qsvd_allocation_gives_rank_to_important_layers():
    layers = [_synthetic_layer(1.0, 10.0), _synthetic_layer(1.0, 0.1)]
    choices = allocate_qsvd(layers, Budget(kv=0.5), grouping="kv", min_rank=1)
    ranks = [len(c["kv"]) for c in choices]
    assert ranks[0] > ranks[1]
    assert sum(ranks) <= 16


def test_qsvd_allocation_keeps_q_dense_when_only_kv_is_budgeted():
    layers = [_synthetic_layer(5.0, 1.0) for _ in range(3)]
    choices = allocate_qsvd(layers, Budget(kv=0.5), grouping="auto", min_rank=1)
    assert all(set(c) == {"kv"} for c in choices)


def test_rank_multiple_rounds_every_cached_rank_and_keeps_the_budget():
    """Layers of odd importance decays: without rounding some cached ranks come out odd; with rank_multiple=2 every
    one is even, the KV budget still holds, and it spends the slack it can (within one step of the plain total)."""
    from qsvd_export.compress.allocate import _totals

    layers = [_synthetic_layer(1.0, scale) for scale in (10.0, 3.0, 1.0, 0.3, 0.1)]
    for li, s in enumerate(layers):  # distinct decays so that prices cut at odd ranks
        s.importance["kv"] = s.importance["kv"] * np.exp(-np.arange(16) * 0.07 * li)
    budget = Budget(kv=0.47)
    plain = allocate_qsvd(layers, budget, grouping="kv", min_rank=1)
    assert any(len(c["kv"]) % 2 for c in plain)  # the case the rounding exists for
    even = allocate_qsvd(layers, budget, grouping="kv", min_rank=1, rank_multiple=2)
    assert all(len(c["kv"]) % 2 == 0 for c in even)
    assert _totals(layers, even)[1] <= budget.kv + 1e-12
    assert sum(len(c["kv"]) for c in even) >= sum(len(c["kv"]) for c in plain) - 2 * len(layers)
    assert all(np.all(np.diff(c["kv"]) > 0) for c in even)  # kept indices stay sorted and unique


def test_uniform_allocation_is_the_largest_rank_that_fits():
    layers = [_synthetic_layer(1.0, 1.0) for _ in range(2)]
    choices = allocate_uniform(layers, Budget(kv=0.5), grouping="kv")
    assert [len(c["kv"]) for c in choices] == [8, 8]


def test_rotations_are_orthogonal():
    for matrix in (random_orthogonal(12, 3), randomized_hadamard(16, 3)):
        eye = torch.eye(matrix.shape[0], dtype=torch.float64)
        assert torch.allclose(matrix @ matrix.T, eye, atol=1e-12)
    with pytest.raises(ValueError):
        randomized_hadamard(12, 0)


def test_kfac_importance_needs_fisher_whitening_and_meets_the_budget():
    loaded = load_model("tiny-llama")
    plan = compress_model(loaded, CompressOptions(parse_budget("kv=0.5"), importance="kfac", grad_windows=4),
                          windows=WINDOWS)
    assert plan.r2 <= 0.5 and plan.method["importance"] == "kfac"
    with pytest.raises(UsageError, match="needs the output Fisher"):
        compress_model(loaded, CompressOptions(parse_budget("kv=0.5"), importance="kfac", whitening="absmean",
                                               grad_windows=4), windows=WINDOWS)


def test_encoder_gradient_importance_uses_the_hidden_state_probe():
    loaded = load_model("tiny-bert")
    options = CompressOptions(parse_budget("params=0.7"), grad_windows=4)
    plan = compress_model(loaded, options, windows=WINDOWS)
    assert plan.method["importance"] == "gradient"
    assert plan.method["whitening"].startswith("fisher (input cholesky")
    assert plan.calibration["gradient_windows"] == 4
    assert plan.r1 <= 0.7
    # the probe is seeded by the window index: same plan bytes twice
    again = compress_model(loaded, options, windows=WINDOWS)
    assert all(torch.equal(again.tensors[k], v) for k, v in plan.tensors.items())


def test_hidden_state_probe_is_seeded_by_the_window_index():
    from qsvd_export.compress.calibrate import hidden_state_probe_loss

    loaded = load_model("tiny-bert")
    ids = torch.from_numpy(WINDOWS[:1])
    loss = hidden_state_probe_loss(loaded.model, ids, 3)
    assert torch.equal(loss, hidden_state_probe_loss(loaded.model, ids, 3))
    assert not torch.equal(loss, hidden_state_probe_loss(loaded.model, ids, 4))


def test_a_kv_only_budget_skips_the_unused_q_candidates_and_plans_the_same():
    from qsvd_export.compress.compressor import analyze, build_plan

    loaded = load_model("tiny-llama")
    options = CompressOptions(parse_budget("kv=0.5"), grad_windows=4, min_rank=2)
    analysis = analyze(loaded, options, windows=WINDOWS)
    assert set(analysis.svds[0]) == {"qkv", "kv"}
    every = build_plan(loaded.name, "llama", analyze(loaded, options, windows=WINDOWS, groups=("qkv", "kv", "q")), options)
    plan = build_plan(loaded.name, "llama", analysis, options)
    assert plan.to_json() == every.to_json()
    assert all(torch.equal(plan.tensors[name], every.tensors[name]) for name in every.tensors)
