"""Chat quality of a bundle against dense (EVAL.md "Chat quality", for instruct models).

Two measures on the project's own set (``corpora/chat_prompts.json``, never used for calibration):

- **Next-token KL and top-1 agreement**: each prompt is formatted with the model's chat template, dense
  replies greedily (``reply_tokens`` at most), and prompt + reply is scored in one teacher-forced pass
  by dense and by the bundle. Over the positions that predict the reply tokens: mean KL(dense ‖ bundle)
  in nats per token, its 95th percentile, and the share of positions where the two argmaxes agree.
- **Closed-book QA**: each question, chat-formatted, is answered greedily (``answer_tokens`` at most); an
  answer is correct when it contains an accepted string as whole words (case-insensitive, NFKC). The
  score is how many of dense's correct answers the bundle keeps.

Models are driven through :class:`Scorer` (an ONNX bundle, dynamic or static, or a torch model), so the
same code serves ``benchmarks.chat_quality``, ``compress --eval`` and the demo.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from qsvd_export.errors import BadInputError, UsageError

CHAT_SET = Path(__file__).parent / "corpora" / "chat_prompts.json"
REPLY_TOKENS = 32
ANSWER_TOKENS = 24


@dataclass(frozen=True)
class ChatSet:
    prompts: list[str]
    qa: list[tuple[str, list[str]]]  # (question, accepted answers)


def load_chat_set(path: str | Path = CHAT_SET) -> ChatSet:
    """Read and check a chat set file (``prompts``: strings; ``qa``: {question, answers})."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        prompts = [str(p) for p in data["prompts"]]
        qa = [(str(item["question"]), [str(a) for a in item["answers"]]) for item in data["qa"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{path}: not a chat set ({err})") from None
    if not prompts or not qa or any(not p.strip() for p in prompts) \
            or any(not q.strip() or not a or any(not s.strip() for s in a) for q, a in qa):
        raise BadInputError(f"{path}: a chat set needs non-empty prompts and questions with accepted answers")
    return ChatSet(prompts, qa)


def chat_ids(tokenizer: Any, message: str, raw: bool = False) -> list[int]:
    """Ids of one user ``message`` in the tokenizer's chat template, ending with the assistant's turn.

    ``raw``: plain tokens for a tokenizer without a template (tiny test models); otherwise no template
    is an error, since the measure is defined on chat-formatted text."""
    if raw:
        return [int(i) for i in tokenizer(message, add_special_tokens=False)["input_ids"]]
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template: the chat measure is for instruct models")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(i) for i in ids]


class Scorer(Protocol):
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one sequence from an empty cache."""

    def generate(self, ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
        """Greedy continuation of ``ids`` (stops after an id in ``eos``)."""


class BundleScorer:
    """A decoder bundle through the project's runtime: DecoderRunner, or StaticDecoder for npu bundles."""

    def __init__(self, bundle: str | Path, target: str = "cpu", options: Any = None) -> None:
        from qsvd_export.bundle import load_bundle_config

        config = load_bundle_config(Path(bundle))
        if config.static_shapes:
            from qsvd_export.runtimes.static_decode import StaticDecoder

            self.static: Any = StaticDecoder.from_bundle(bundle, target, options)
            self.runner: Any = None
        else:
            from qsvd_export.runtimes.decode import DecoderRunner

            self.static, self.runner = None, DecoderRunner(bundle, target, options)
        self.eos: list[int] = [int(i) for i in config.generation.get("eos_token_ids") or []]

    def logits(self, ids: list[int]) -> np.ndarray:
        if self.runner is not None:
            return self.runner.prefill(np.asarray([ids], dtype=np.int64))[0][0]
        return static_sequence_logits(self.static, ids)

    def generate(self, ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
        return (self.runner or self.static).generate(ids, max_new_tokens, eos)


def static_sequence_logits(decoder: Any, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] through static graphs, chunked as ``StaticDecoder.prefill`` chunks a prompt
    (first chunk left-padded with masked slots)."""
    size = decoder.prefill_length
    if not ids or len(ids) > decoder.context:
        raise UsageError(f"a sequence of {len(ids)} tokens does not fit the static cache of {decoder.context}")
    first = len(ids) % size or size
    state, out = decoder.empty_state(), []
    for start in range(0, len(ids), size):
        chunk = [int(t) for t in ids[max(0, start - (size - first)):start + first]]
        pad = size - len(chunk)
        logits, state = decoder.step(state, [0] * pad + chunk, [False] * pad + [True] * len(chunk))
        out.append(logits[pad:])
    return np.concatenate(out)


class TorchScorer:
    """A Hugging Face causal LM in torch (``compress --eval``'s dense reference)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()

    def generate(self, ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
        import torch

        new: list[int] = []
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(max_new_tokens):
                new.append(int(out.logits[0, -1].argmax()))
                if new[-1] in eos or len(new) == max_new_tokens:
                    break
                out = self.model(input_ids=torch.tensor([[new[-1]]]), cache=out.cache, use_cache=True)
        return new


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_kl(dense: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(dense ‖ other) in nats at each row of two logit arrays [n, vocab] (float64)."""
    if dense.shape != other.shape:
        raise BadInputError(f"logit shapes differ: {dense.shape} vs {other.shape} (same tokenizer?)")
    p, q = _log_softmax(dense), _log_softmax(other)
    return np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0)


def answer_correct(text: str, answers: list[str]) -> bool:
    """``text`` contains one of ``answers`` as whole words (case-insensitive, NFKC-normalised)."""
    norm = unicodedata.normalize("NFKC", text).casefold()
    return any(re.search(rf"(?<!\w){re.escape(unicodedata.normalize('NFKC', a).casefold())}(?!\w)", norm)
               for a in answers)


def chat_quality(dense: Scorer, bundles: dict[str, Scorer], tokenizer: Any, eos: list[int],
                 chat_set: ChatSet | None = None, reply_tokens: int | None = None,
                 answer_tokens: int | None = None, raw: bool = False,
                 progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Both measures for each of ``bundles`` against ``dense`` (see the module docstring).

    Returns JSON-ready {"settings", "dense": {qa_correct, qa_total}, "bundles": {name: {kl_mean, kl_p95,
    top1_agreement, positions, qa_correct, qa_kept, qa_dense_correct, qa_kept_share}}, "prompts": [...],
    "qa": [...]} with every reply and answer text. ``progress`` ticks once per prompt and question.
    ``reply_tokens``/``answer_tokens`` default to :data:`REPLY_TOKENS`/:data:`ANSWER_TOKENS`."""
    chat_set = chat_set or load_chat_set()
    reply_tokens, answer_tokens = reply_tokens or REPLY_TOKENS, answer_tokens or ANSWER_TOKENS
    kls: dict[str, list[np.ndarray]] = {name: [] for name in bundles}
    agree: dict[str, list[np.ndarray]] = {name: [] for name in bundles}
    prompt_rows = []
    for message in chat_set.prompts:
        ids = chat_ids(tokenizer, message, raw)
        reply = dense.generate(ids, reply_tokens, eos)
        sequence = ids + reply
        scored = slice(len(ids) - 1, len(sequence) - 1)  # positions predicting the reply tokens
        reference = dense.logits(sequence)[scored]
        row: dict[str, Any] = {"prompt": message, "dense_reply": tokenizer.decode(reply, skip_special_tokens=True),
                               "kl_mean": {}}
        for name, scorer in bundles.items():
            logits = scorer.logits(sequence)[scored]
            kls[name].append(next_token_kl(reference, logits))
            agree[name].append(reference.argmax(-1) == logits.argmax(-1))
            row["kl_mean"][name] = round(float(kls[name][-1].mean()), 5)
        prompt_rows.append(row)
        if progress is not None:
            progress()
    qa_rows, correct = [], {"dense": []} | {name: [] for name in bundles}
    for question, answers in chat_set.qa:
        ids = chat_ids(tokenizer, question, raw)
        row = {"question": question, "answers": answers}
        for name, scorer in {"dense": dense, **bundles}.items():
            text = tokenizer.decode(scorer.generate(ids, answer_tokens, eos), skip_special_tokens=True).strip()
            correct[name].append(answer_correct(text, answers))
            row[name] = {"answer": text, "correct": correct[name][-1]}
        qa_rows.append(row)
        if progress is not None:
            progress()
    dense_ok = np.asarray(correct["dense"], dtype=bool)
    summary = {}
    for name in bundles:
        kl, ok = np.concatenate(kls[name]), np.asarray(correct[name], dtype=bool)
        kept = int((dense_ok & ok).sum())
        summary[name] = {
            "kl_mean": round(float(kl.mean()), 5), "kl_p95": round(float(np.percentile(kl, 95)), 5),
            "top1_agreement": round(float(np.concatenate(agree[name]).mean()), 4), "positions": int(kl.size),
            "qa_correct": int(ok.sum()), "qa_dense_correct": int(dense_ok.sum()), "qa_kept": kept,
            "qa_kept_share": round(kept / int(dense_ok.sum()), 4) if dense_ok.any() else None,
        }
    return {
        "settings": {"prompts": len(chat_set.prompts), "qa": len(chat_set.qa), "reply_tokens": reply_tokens,
                     "answer_tokens": answer_tokens, "chat_template": not raw,
                     "kl": "KL(dense || bundle), nats per reply token, teacher-forced on dense's greedy reply"},
        "dense": {"qa_correct": int(dense_ok.sum()), "qa_total": len(chat_set.qa)},
        "bundles": summary, "prompts": prompt_rows, "qa": qa_rows,
    }


def summary_line(result: dict[str, Any], name: str) -> str:
    """One line for a printout: KL, top-1 agreement and QA answers kept for bundle ``name``."""
    s = result["bundles"][name]
    return (f"KL {s['kl_mean']:.4f} nats/token, top-1 agreement {s['top1_agreement']:.3f} "
            f"({result['settings']['prompts']} chat prompts); QA: keeps {s['qa_kept']}/{s['qa_dense_correct']} "
            f"of dense's correct answers ({s['qa_correct']}/{result['settings']['qa']} correct)")


def bundle_chat_quality(dense: str | Path | Scorer, bundles: dict[str, str | Path], target: str = "cpu",
                        options: Any = None, tokenizer: Any = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`chat_quality` of ONNX bundles; ``dense`` is a bundle folder or a :class:`Scorer` (then pass
    ``tokenizer``). Tokenizer and EOS ids come from the first bundle when not given."""
    from qsvd_export.bundle import bundle_tokenizer

    scorers = {name: BundleScorer(path, target, options) for name, path in bundles.items()}
    first = next(iter(bundles.values()))
    if isinstance(dense, (str, Path)):
        first, dense = dense, BundleScorer(dense, target, options)
    tokenizer = tokenizer if tokenizer is not None else bundle_tokenizer(Path(first))
    eos = next(iter(scorers.values())).eos
    if "progress" in kwargs:
        return chat_quality(dense, scorers, tokenizer, eos, **kwargs)
    from qsvd_export.progress import bar

    chat_set = kwargs.pop("chat_set", None) or load_chat_set()
    progress = bar(len(chat_set.prompts) + len(chat_set.qa), "chat quality (prompts, then QA)")
    try:
        return chat_quality(dense, scorers, tokenizer, eos, chat_set, progress=progress.update, **kwargs)
    finally:
        progress.close()
