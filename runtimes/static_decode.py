"""Decode loop over a static prefill/decode graph pair (NPU bundles; contract in passes/static_shapes.py).

State: a right-aligned cache of ``context`` slots per cache tensor plus a 0/1 slot mask. A call with
``s`` new tokens feeds the last ``context - s`` slots as ``past`` and the mask of those slots followed
by the new tokens' validity; its ``present`` (``context`` slots) becomes the new state. Prompts are cut
into chunks of the prefill length; the first chunk is left-padded with masked slots (token 0, position 0)
so that real tokens stay contiguous (sliding-window layers measure distance in slots).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import LayerCache, load_bundle_config
from qsvd_export.errors import BadInputError, UsageError
from qsvd_export.runtimes.metrics import window_nll
from qsvd_export.runtimes.sessions import SessionOptions, create_session


@dataclass
class StaticState:
    cache: dict[str, np.ndarray]  # cache input name → [.., context slots, ..]
    mask: np.ndarray  # int64 [context]: 1 = slot holds a real token
    next_position: int = 0


class StaticDecoder:
    """Two sessions (``prefill``: ``prefill_length`` tokens, ``decode``: 1 token) over one cache window."""

    def __init__(self, prefill: Any, decode: Any, cache: list[LayerCache], context: int, prefill_length: int) -> None:
        self.sessions = {prefill_length: prefill, 1: decode}
        self.tensors = [t for layer in cache for t in layer.tensors]
        self.context = context
        self.prefill_length = prefill_length

    @classmethod
    def from_files(cls, prefill_path: Path, decode_path: Path, cache: list[LayerCache], context: int,
                   prefill_length: int, target: str = "cpu", options: SessionOptions | None = None) -> "StaticDecoder":
        return cls(create_session(prefill_path, target, options), create_session(decode_path, target, options),
                   cache, context, prefill_length)

    @classmethod
    def from_bundle(cls, bundle: str | Path, target: str = "cpu", options: SessionOptions | None = None) -> "StaticDecoder":
        bundle = Path(bundle)
        config = load_bundle_config(bundle)
        if not config.static_shapes:
            raise UsageError(f"{bundle}: not a static-shape (npu) bundle")
        files = {role: config.graph(role).filename for role in ("prefill", "decode")}
        if target == "npu":  # built to run whole on HTP (no CPU fallback); context binaries load without compiling
            options = replace(options or SessionOptions(), strict=True,
                              htp_arch=(options.htp_arch if options else None) or config.static_shapes.get("htp_arch"))
            files.update(config.static_shapes.get("qnn_context_models", {}))
        return cls.from_files(bundle / files["prefill"], bundle / files["decode"],
                              config.cache, int(config.static_shapes["context_length"]),
                              int(config.static_shapes["prefill_length"]), target, options)

    def empty_state(self) -> StaticState:
        cache = {}
        for tensor in self.tensors:
            shape = [1 if d == "batch_size" else self.context if d == "past_sequence_length" else d for d in tensor.shape]
            cache[tensor.input] = np.zeros(shape, dtype=tensor.dtype)  # numpy names
        return StaticState(cache, np.zeros(self.context, dtype=np.int64))

    def feed(self, state: StaticState, tokens: list[int], valid: list[bool]) -> tuple[np.ndarray, dict[str, Any]]:
        """The input feed for ``len(tokens)`` new tokens (1 or the prefill length) after ``state``."""
        seq = len(tokens)
        keep = self.context - seq
        positions, position = [], state.next_position
        for ok in valid:
            positions.append(position if ok else 0)
            position += int(ok)
        mask = np.concatenate([state.mask[-keep:], np.asarray(valid, dtype=np.int64)])
        feed: dict[str, Any] = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": mask[None, :],
            "position_ids": np.asarray([positions], dtype=np.int64),
        }
        for tensor in self.tensors:
            past = state.cache[tensor.input]
            index = [slice(None)] * past.ndim
            index[tensor.sequence_axis] = slice(self.context - keep, None)
            feed[tensor.input] = np.ascontiguousarray(past[tuple(index)])
        return mask, feed

    def step(self, state: StaticState, tokens: list[int], valid: list[bool] | None = None) -> tuple[np.ndarray, StaticState]:
        """Run one graph; returns logits [seq, vocab] and the next state."""
        logits, state, _ = self.step_with_feed(state, tokens, valid)
        return logits, state

    def step_with_feed(self, state: StaticState, tokens: list[int],
                       valid: list[bool] | None = None) -> tuple[np.ndarray, StaticState, dict[str, Any]]:
        """:meth:`step`, also returning the input feed it ran (calibration records it)."""
        valid = valid if valid is not None else [True] * len(tokens)
        if len(tokens) not in self.sessions:
            raise UsageError(f"static graphs take 1 or {self.prefill_length} tokens per call, not {len(tokens)}")
        if state.next_position + sum(valid) > self.context:
            raise UsageError(f"the static cache holds {self.context} tokens; this call would exceed it")
        mask, feed = self.feed(state, tokens, valid)
        session = self.sessions[len(tokens)]
        names = ["logits", *(t.output for t in self.tensors)]
        values = dict(zip(names, session.run(names, feed)))
        cache = {t.input: values[t.output] for t in self.tensors}
        return values["logits"][0], StaticState(cache, mask, state.next_position + sum(valid)), feed

    def prefill(self, prompt_ids: list[int], state: StaticState | None = None) -> tuple[np.ndarray, StaticState]:
        """Feed a prompt in chunks of the prefill length; returns the last real token's logits [vocab]."""
        if not prompt_ids:
            raise BadInputError("empty prompt")
        state = state or self.empty_state()
        size = self.prefill_length
        first = len(prompt_ids) % size or size  # pad the first chunk: real tokens stay contiguous in the cache
        logits = None
        for start in range(0, len(prompt_ids), size):
            chunk = list(prompt_ids[max(0, start - (size - first)):start + first])
            pad = size - len(chunk)
            logits, state = self.step(state, [0] * pad + chunk, [False] * pad + [True] * len(chunk))
        assert logits is not None
        return logits[-1], state

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int] | None = None) -> list[int]:
        """Greedy generation for one prompt; returns the new token ids (stops after an EOS id)."""
        eos = set(eos_ids or [])
        logits, state = self.prefill(prompt_ids)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            tokens.append(int(np.argmax(logits)))
            if tokens[-1] in eos or len(tokens) == max_new_tokens:
                break
            step_logits, state = self.step(state, [tokens[-1]])
            logits = step_logits[-1]
        return tokens

    def window_nlls(self, windows: np.ndarray, progress=None) -> list[float]:  # type: ignore[no-untyped-def]
        """Mean NLL of each row of ``windows`` [n, L], each from an empty cache.

        ``L`` must be a multiple of the prefill length and fit the cache window: a row is fed as
        ``L / prefill_length`` consecutive prefill chunks (the cache carries the earlier chunks), so a
        static bundle scores the same windows (e.g. EVAL.md's 512 tokens) as a dynamic one."""
        length = windows.shape[1]
        if length % self.prefill_length or length > self.context:
            raise UsageError(f"windows must be a multiple of {self.prefill_length} tokens and at most "
                             f"{self.context} (the cache window) for these static graphs, not {length}")
        nlls = []
        for row in windows:
            state, chunks = self.empty_state(), []
            for start in range(0, length, self.prefill_length):
                logits, state = self.step(state, [int(t) for t in row[start:start + self.prefill_length]])
                chunks.append(logits)
            nlls.append(window_nll(np.concatenate(chunks), row))
            if progress is not None:
                progress()
        return nlls
