"""Chat-quality measure: KL/top-1 against dense, QA answers kept, static graphs, the set file, the benchmark CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsvd_export.chat_quality import (BundleScorer, ChatSet, answer_correct, chat_ids, chat_quality, load_chat_set,
                                      next_token_kl, static_sequence_logits)
from qsvd_export.data import read_text
from qsvd_export.errors import BadInputError, UsageError
from qsvd_export.tiny import ByteTokenizer

TOK = ByteTokenizer()


def test_the_project_set_is_large_enough_and_apart_from_calibration():
    chat_set = load_chat_set()
    assert len(chat_set.prompts) >= 40 and len(chat_set.qa) >= 40
    assert len(set(chat_set.prompts)) == len(chat_set.prompts) and len({q for q, _ in chat_set.qa}) == len(chat_set.qa)
    calib = read_text("wiki_calib")
    assert not any(p in calib for p in chat_set.prompts) and not any(q in calib for q, _ in chat_set.qa)


def test_broken_chat_sets_are_refused(tmp_path):
    for body in ("not json", json.dumps({"prompts": ["hi"]}), json.dumps({"prompts": ["hi"], "qa": [{"question": "q", "answers": []}]})):
        (tmp_path / "set.json").write_text(body)
        with pytest.raises(BadInputError):
            load_chat_set(tmp_path / "set.json")


def test_kl_matches_torch_and_is_zero_only_for_equal_distributions():
    rng = np.random.default_rng(0)
    dense, other = rng.normal(size=(5, 50)), rng.normal(size=(5, 50))
    reference = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(other), -1),
                                           torch.log_softmax(torch.tensor(dense), -1), log_target=True,
                                           reduction="none").sum(-1).numpy()
    assert np.allclose(next_token_kl(dense, other), reference, atol=1e-12)
    assert np.allclose(next_token_kl(dense, dense + 3.0), 0.0, atol=1e-12)  # a shift is the same distribution
    with pytest.raises(BadInputError):
        next_token_kl(dense, other[:, :10])


def test_answer_matching_takes_whole_words_only():
    assert answer_correct("The capital of France is PARIS.", ["Paris"])
    assert answer_correct("Water freezes at 0°C.", ["0", "zero"])
    assert not answer_correct("It boils at 100 degrees.", ["0"])
    assert not answer_correct("Parisian cafés", ["Paris"])
    assert answer_correct("Leonardo da Vinci painted it", ["Leonardo", "da Vinci"])


def test_chat_ids_need_a_template_unless_raw():
    with pytest.raises(UsageError, match="chat template"):
        chat_ids(TOK, "hello")
    assert chat_ids(TOK, "hi", raw=True) == [104, 105]


class _Scripted:
    """Answers each question with a fixed text; logits: a fixed table per position (vocab 256)."""

    def __init__(self, answers: dict[str, str], shift: float = 0.0) -> None:
        self.answers, self.shift = answers, shift

    def generate(self, ids, max_new_tokens, eos):
        return list(self.answers.get(TOK.decode(ids), "ok").encode())[:max_new_tokens]

    def logits(self, ids):
        table = np.zeros((len(ids), 256))
        table[np.arange(len(ids)), np.asarray(ids) % 256] = 5.0
        table[:, 7] += self.shift
        return table


def test_qa_counts_how_many_of_denses_correct_answers_the_bundle_keeps():
    qa = [("q1", ["a"]), ("q2", ["b"]), ("q3", ["c"]), ("q4", ["d"])]
    dense = _Scripted({"q1": "a", "q2": "b", "q3": "c", "q4": "x"})
    bundle = _Scripted({"q1": "x", "q2": "b", "q3": "c", "q4": "d"}, shift=10.0)
    result = chat_quality(dense, {"b": bundle, "same": dense}, TOK, [], ChatSet(["p1", "p2"], qa), raw=True)
    s = result["bundles"]["b"]
    assert (s["qa_dense_correct"], s["qa_correct"], s["qa_kept"], s["qa_kept_share"]) == (3, 3, 2, round(2 / 3, 4))
    assert s["kl_mean"] > 1.0 and s["top1_agreement"] < 1.0
    same = result["bundles"]["same"]
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0 and same["qa_kept"] == 3
    assert result["qa"][0]["b"] == {"answer": "x", "correct": False}


def test_bundles_score_against_a_dense_bundle(bundles):
    from qsvd_export.chat_quality import bundle_chat_quality

    dense, other = bundles.dense("llama"), bundles.dense("qwen2")
    chat_set = ChatSet(["Hello there", "Name a colour"], [("Capital of France?", ["Paris"])])
    result = bundle_chat_quality(dense, {"self": dense, "other": other}, chat_set=chat_set, reply_tokens=6,
                                 answer_tokens=4, raw=True)
    assert result["bundles"]["self"]["kl_mean"] == 0.0 and result["bundles"]["self"]["top1_agreement"] == 1.0
    assert result["bundles"]["self"]["positions"] == 12
    assert result["bundles"]["other"]["kl_mean"] > 0.01 and result["bundles"]["other"]["top1_agreement"] < 1.0


def test_static_graph_logits_match_the_dynamic_graph(bundles, tmp_path):
    from qsvd_export.bundle import load_bundle_config
    from qsvd_export.targets.npu.options import NpuOptions
    from qsvd_export.targets.npu.static_graphs import static_float_graphs
    from qsvd_export.runtimes.static_decode import StaticDecoder

    bundle = bundles.dense("llama")
    paths, _ = static_float_graphs(bundle / "model.onnx", tmp_path, NpuOptions(prefill_length=8, context_length=48))
    static = StaticDecoder.from_files(paths["prefill"], paths["decode"], load_bundle_config(bundle).cache, 48, 8)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 256, 21)]  # 5 real tokens in a padded chunk + 2 full
    dynamic = BundleScorer(bundle).logits(ids)
    assert np.abs(static_sequence_logits(static, ids) - dynamic).max() < 1e-4
    with pytest.raises(UsageError):
        static_sequence_logits(static, list(range(49)))


def test_benchmark_writes_json_and_refuses_bad_input(bundles, tmp_path, capsys):
    from benchmarks.chat_quality import main

    dense = bundles.dense("llama")
    out = tmp_path / "chat.json"
    assert main([str(dense), str(dense), "--raw", "--prompts", "1", "--qa", "1", "--reply-tokens", "3",
                 "--answer-tokens", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["prompts"] == 1 and result["bundles"]["dense-llama"]["kl_mean"] == 0.0
    assert main([str(dense), str(tmp_path / "missing"), "--raw", "--out", str(out)]) == 3
    assert main([str(dense), str(dense), "--out", str(out), "--prompts", "1", "--qa", "1"]) == 2  # no template
    assert main([str(dense), str(dense), "--raw", "--prompts", "0"]) == 2
    err = capsys.readouterr().err
    assert "bundle folder not found" in err and "chat template" in err and "Traceback" not in err


class _ChatBytes(ByteTokenizer):
    """Byte tokenizer with a toy chat template (tiny models have none)."""

    chat_template = "toy"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return list(f"<u>{messages[-1]['content']}<a>".encode())


def test_chat_ids_use_the_template():
    assert _ChatBytes().decode(chat_ids(_ChatBytes(), "hi")) == "<u>hi<a>"


def test_compress_eval_adds_chat_quality_for_instruct_models(bundles, monkeypatch):
    from dataclasses import replace

    from qsvd_export.chat_quality import summary_line
    from qsvd_export.build.evaluate import evaluate_bundle
    from qsvd_export.tiny import build_tiny

    monkeypatch.setattr("qsvd_export.compress.apply_plan.apply_plan", lambda model, plan: model)  # the dense bundle has no plan
    small = ChatSet(["Hello there", "Name a colour"], [("Capital of France?", ["Paris"])])
    monkeypatch.setattr("qsvd_export.chat_quality.load_chat_set", lambda: small)  # seconds, not minutes
    monkeypatch.setattr("qsvd_export.chat_quality.REPLY_TOKENS", 4)
    monkeypatch.setattr("qsvd_export.chat_quality.ANSWER_TOKENS", 3)
    loaded = replace(build_tiny("llama"), tokenizer=_ChatBytes())  # the weights of bundles.dense("llama")
    result = evaluate_bundle(loaded, None, bundles.dense("llama"), "wiki_eval", 1)
    chat = result["chat"]
    assert chat["settings"]["prompts"] == 2 and chat["settings"]["reply_tokens"] == 4 and chat["settings"]["chat_template"]
    s = chat["bundles"]["bundle"]  # dense ONNX against dense torch: the same model
    assert s["kl_mean"] < 1e-4 and s["top1_agreement"] > 0.99 and s["qa_kept"] == s["qa_dense_correct"]
    assert "top-1 agreement" in summary_line(chat, "bundle")


def test_torch_scorer_generates_like_the_dense_bundle(bundles):
    from qsvd_export.chat_quality import TorchScorer
    from qsvd_export.tiny import build_tiny

    ids = list(b"Hello there")
    torch_scorer, onnx_scorer = TorchScorer(build_tiny("llama").model), BundleScorer(bundles.dense("llama"))
    assert torch_scorer.generate(ids, 8, []) == onnx_scorer.generate(ids, 8, [])
    assert np.abs(torch_scorer.logits(ids) - onnx_scorer.logits(ids)).max() < 1e-3


def test_chat_calibration_windows_are_the_models_replies_to_prompts_kept_apart():
    """Chat-formatted calibration: the calibration prompts are disjoint from the chat-quality set; windows are the
    templated prompts followed by the dense model's greedy replies, deterministic; mixed = half wiki, half chat."""
    from qsvd_export.chat_calibration import CALIB_PROMPTS, chat_calibration_windows, smooth_calibration_windows
    from qsvd_export.chat_quality import TorchScorer
    from qsvd_export.tiny import build_tiny

    prompts = json.loads(CALIB_PROMPTS.read_text())["prompts"]
    chat_set = load_chat_set()
    assert len(prompts) >= 40 and not set(prompts) & (set(chat_set.prompts) | {q for q, _ in chat_set.qa})
    model, tokenizer = build_tiny("llama").model, _ChatBytes()
    windows = chat_calibration_windows(model, tokenizer, 2, 64, reply_tokens=8)
    assert windows.shape == (2, 64) and windows.dtype == np.int64
    first = chat_ids(tokenizer, prompts[0])
    reply = TorchScorer(model).generate(first, 8, [])
    assert windows.reshape(-1)[:len(first) + len(reply)].tolist() == first + reply
    np.testing.assert_array_equal(windows, chat_calibration_windows(model, tokenizer, 2, 64, reply_tokens=8))
    mixed = smooth_calibration_windows(model, tokenizer, "mixed", 2, 64)
    chat_only = chat_calibration_windows(model, tokenizer, 1, 64)
    assert mixed.shape == (2, 64) and mixed[1].tolist() == chat_only[0].tolist()  # half wiki_calib, then chat
    assert mixed[0].tolist() == smooth_calibration_windows(model, tokenizer, "wiki", 1, 64)[0].tolist()
    with pytest.raises(UsageError, match="chat template"):
        chat_calibration_windows(model, ByteTokenizer(), 1, 64)
    from qsvd_export.chat_calibration import resolve_smooth_calibration

    assert resolve_smooth_calibration("auto", tokenizer) == "chat"  # instruct models: chat-formatted (dev-chosen)
    assert resolve_smooth_calibration("auto", ByteTokenizer()) == "wiki"  # no template: wiki_calib
    assert resolve_smooth_calibration("mixed", ByteTokenizer()) == "mixed"
    np.testing.assert_array_equal(smooth_calibration_windows(model, tokenizer, "auto", 1, 64), chat_only)
    with pytest.raises(UsageError, match="fewer than"):
        chat_calibration_windows(model, tokenizer, 1000, 64, reply_tokens=1)


def test_smooth_calib_needs_smoothing_and_a_chat_template(tmp_path, capsys):
    from qsvd_export.cli import main

    code = main(["export", "tiny-llama", "-o", str(tmp_path / "a"), "--target", "cpu", "--bits", "w4a8",
                 "--no-smooth", "--smooth-calib", "chat"])
    assert code == 2 and "does nothing with --no-smooth" in capsys.readouterr().err
    code = main(["export", "tiny-llama", "-o", str(tmp_path / "b"), "--target", "cpu", "--bits", "w4a8",
                 "--smooth", "--smooth-calib", "chat", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "chat template" in err and len(err.splitlines()) == 1 and not (tmp_path / "b").exists()
