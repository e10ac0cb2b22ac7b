#!/usr/bin/env python3
"""Reference greedy decoder for a qsvd-export bundle, using only onnxruntime, tokenizers and numpy.

    python samples/run_bundle.py BUNDLE --prompt "..." [--max-new-tokens N] [--print-ids]
    python samples/run_bundle.py BUNDLE --ids 1,2,3 [--max-new-tokens N] [--print-ids]

It reads ``BUNDLE/qsvd_config.json`` and drives either the dynamic graph (role ``model``) or the
static prefill/decode pair of an npu bundle on the CPU execution provider. The prompt is encoded as-is
(no chat template). The loop contract is written out in ``samples/README.md``; this file is the
reference for ports. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

DTYPES = {"float32": np.float32, "float16": np.float16, "uint16": np.uint16, "int16": np.int16,
          "uint8": np.uint8, "int8": np.int8}


class BundleError(Exception):
    """Anything wrong with the bundle or the arguments: reported as one line, exit code 2."""


@dataclass
class CacheTensor:
    """One cache tensor: fed as ``input`` (``past_*``), returned as ``output`` (``present.*``)."""

    input: str
    output: str
    shape: list[Any]  # ints plus the symbols "batch_size" and "past_sequence_length"
    dtype: str
    axis: int  # the sequence axis


@dataclass
class Bundle:
    folder: Path
    config: dict[str, Any]
    tensors: list[CacheTensor]  # every layer's cache tensors, layer order
    graphs: dict[str, str]  # role → file name
    eos: set[int]
    prefill_chunk: int  # prompt tokens per call of the dynamic graph; 0: the whole prompt (fused attention)


def load_bundle(folder: Path) -> Bundle:
    """Read and check ``qsvd_config.json`` (format ``qsvd-export-bundle`` v1, kind ``decoder``)."""
    path = folder / "qsvd_config.json"
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found")
    if not path.is_file():
        raise BundleError(f"{folder}: not a bundle (no qsvd_config.json)")
    try:
        config = json.loads(path.read_text())
        if config.get("format") != "qsvd-export-bundle" or config.get("format_version") != 1:
            raise BundleError(f"{path}: not a qsvd-export bundle config, format version 1")
        if config.get("kind") != "decoder":
            raise BundleError(f"{folder}: a {config.get('kind')} bundle has no decode loop")
        tensors = [CacheTensor(t["input"], t["output"], list(t["shape"]), t["dtype"], int(t["sequence_axis"]))
                   for layer in config["cache"] for t in layer["tensors"]]
        graphs = {g["role"]: g["filename"] for g in config["graphs"]}
        eos = {int(i) for i in config.get("generation", {}).get("eos_token_ids") or []}
        prefill_chunk = int(config.get("prefill_chunk") or 0)
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk {prefill_chunk} is negative")
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: malformed bundle config ({exc.__class__.__name__}: {exc})") from None
    if any(t.dtype not in DTYPES for t in tensors):
        raise BundleError(f"{path}: unsupported cache dtype")
    return Bundle(folder, config, tensors, graphs, eos, prefill_chunk)


def open_session(bundle: Bundle, role: str) -> ort.InferenceSession:
    """A CPU-EP session over the graph of ``role`` (same settings as qsvd-export's runtime)."""
    if role not in bundle.graphs:
        raise BundleError(f"{bundle.folder}: bundle has no '{role}' graph (has: {', '.join(bundle.graphs)})")
    path = bundle.folder / bundle.graphs[role]
    if not path.is_file():
        raise BundleError(f"{path}: graph file missing")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = min(os.cpu_count() or 1, 8)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain Exception subclasses
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise BundleError(f"could not load {path.name}: {first}") from None


class Loop:
    """One decode loop. ``start`` feeds the prompt, ``push`` one token; both return the logits
    (float32 [vocab]) of the last real token. ``length`` counts tokens held in the cache."""

    capacity: int | None  # most tokens the cache can hold (None: unbounded)
    cache: dict[str, np.ndarray]  # cache input name → tensor
    length: int = 0

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def run(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run one graph; keeps ``present.*`` as ``self.cache`` (keyed by input name); returns logits [1, S, V]."""
        if "position_ids" not in {i.name for i in session.get_inputs()}:
            feed.pop("position_ids")  # graphs that derive positions themselves
        names = ["logits", *(t.output for t in self.bundle.tensors)]
        try:
            logits, *present = session.run(names, feed)
        except Exception as exc:  # noqa: BLE001 - a graph that does not match its config
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise BundleError(f"onnxruntime failed: {first}") from None
        self.cache = {t.input: value for t, value in zip(self.bundle.tensors, present, strict=True)}
        return logits


class DynamicLoop(Loop):
    """Role ``model``: shapes grow. Cache starts with 0 slots on each sequence axis; every call
    appends the new tokens (``present`` has past + S slots); the mask is all ones over past + S."""

    def __init__(self, bundle: Bundle, prefill_chunk: int = 0) -> None:
        super().__init__(bundle)
        self.prefill_chunk = prefill_chunk  # 0: the whole prompt in one call
        self.session = open_session(bundle, "model")
        self.capacity = int(bundle.config.get("model_config", {}).get("context_length") or 0) or None
        self.cache = {t.input: np.zeros([1 if d == "batch_size" else 0 if d == "past_sequence_length" else d
                                         for d in t.shape], DTYPES[t.dtype]) for t in bundle.tensors}

    def forward(self, tokens: list[int]) -> np.ndarray:
        total = self.length + len(tokens)
        feed = {"input_ids": np.asarray([tokens], np.int64),
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(self.length, total, dtype=np.int64)[None, :], **self.cache}
        logits = self.run(self.session, feed)
        self.length = total
        return logits[0, -1]

    def start(self, prompt: list[int]) -> np.ndarray:
        chunk = self.prefill_chunk or len(prompt)
        for start in range(0, len(prompt), chunk):
            logits = self.forward(prompt[start:start + chunk])
        return logits

    def push(self, token: int) -> np.ndarray:
        return self.forward([token])


class StaticLoop(Loop):
    """Roles ``prefill`` (S = prefill_length tokens) and ``decode`` (1 token) over a right-aligned window
    of T = context_length slots. Each call feeds the last T - S slots of every cache tensor as ``past``
    and ``attention_mask`` = those slots' flags + the new tokens' flags ([1, T]); ``present`` (T slots)
    replaces the cache, so the window moves left by S slots per call."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        static = bundle.config["static_shapes"]
        try:
            self.context, self.prefill_length = int(static["context_length"]), int(static["prefill_length"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{bundle.folder}: static_shapes needs context_length and prefill_length") from None
        self.capacity = self.context  # T real tokens at most (padding scrolls out first)
        self.sessions = {self.prefill_length: open_session(bundle, "prefill"), 1: open_session(bundle, "decode")}
        self.cache = {t.input: np.zeros([1 if d == "batch_size" else self.context if d == "past_sequence_length"
                                         else d for d in t.shape], DTYPES[t.dtype]) for t in bundle.tensors}
        self.mask = np.zeros(self.context, np.int64)  # 1 = slot holds a real token

    def forward(self, tokens: list[int], valid: list[bool]) -> np.ndarray:
        keep = self.context - len(tokens)  # past slots fed back
        positions = []
        for ok in valid:  # real tokens count up from the cache length, padding gets position 0
            positions.append(self.length if ok else 0)
            self.length += ok
        self.mask = np.concatenate([self.mask[-keep:], np.asarray(valid, np.int64)])
        feed = {"input_ids": np.asarray([tokens], np.int64), "attention_mask": self.mask[None, :],
                "position_ids": np.asarray([positions], np.int64)}
        for t in self.bundle.tensors:
            index = [slice(None)] * self.cache[t.input].ndim
            index[t.axis] = slice(self.context - keep, None)
            feed[t.input] = np.ascontiguousarray(self.cache[t.input][tuple(index)])
        return self.run(self.sessions[len(tokens)], feed)[0]

    def start(self, prompt: list[int]) -> np.ndarray:
        """Chunks of S tokens; the first is left-padded (token 0, mask 0) so real tokens stay contiguous."""
        size = self.prefill_length
        first = len(prompt) % size or size
        chunks = [[0] * (size - first) + prompt[:first]]
        chunks += [prompt[i:i + size] for i in range(first, len(prompt), size)]
        for index, chunk in enumerate(chunks):
            pad = size - first if index == 0 else 0
            logits = self.forward(chunk, [False] * pad + [True] * (size - pad))
        return logits[-1]

    def push(self, token: int) -> np.ndarray:
        return self.forward([token], [True])[-1]


def generate(loop: Loop, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy: argmax of the last logits; stops after an EOS id, after ``max_new_tokens``, or when the
    cache is full (the token picked from the full cache's logits is still returned, never fed)."""
    if not prompt:
        raise BundleError("empty prompt")
    if loop.capacity is not None and len(prompt) > loop.capacity:
        raise BundleError(f"prompt of {len(prompt)} tokens does not fit the {loop.capacity}-token context")
    logits = loop.start(prompt)
    new: list[int] = []
    while True:
        new.append(int(np.argmax(logits)))
        if new[-1] in eos or len(new) == max_new_tokens:
            return new
        if loop.capacity is not None and loop.length >= loop.capacity:
            print(f"run_bundle: stopped: the context holds {loop.capacity} tokens", file=sys.stderr)
            return new
        logits = loop.push(new[-1])


class Codec:
    """Text ↔ token ids: ``tokenizer.json`` via the tokenizers library, or UTF-8 bytes (tiny-* bundles)."""

    def __init__(self, bundle: Bundle) -> None:
        self.tokenizer: Any = None
        self.bytes = False
        path = bundle.folder / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            try:
                self.tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
                raise BundleError(f"{path}: cannot load tokenizer ({exc})") from None
        elif not bundle.config.get("tokenizer_files") and str(bundle.config.get("model_name")).startswith("tiny-"):
            self.bytes = True  # tiny test models read UTF-8 bytes (vocab 256)

    @property
    def available(self) -> bool:
        return self.bytes or self.tokenizer is not None

    def encode(self, text: str) -> list[int]:
        if self.bytes:
            return list(text.encode("utf-8"))
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.bytes:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BundleError(f"--ids takes comma-separated integers, not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_bundle", description="greedy generation from a qsvd-export bundle")
    parser.add_argument("bundle", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text, encoded without special tokens and without a chat template")
    source.add_argument("--ids", help="prompt token ids, comma-separated (skips the tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--print-ids", action="store_true", help="also print prompt_ids: and new_ids: lines")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens per call of the dynamic graph (default: the bundle's prefill_chunk, "
                             "recorded for graphs without fused attention, e.g. latent graphs; 0: the whole prompt "
                             "in one call)")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise BundleError("--max-new-tokens must be at least 1")
        if args.prefill_chunk is not None and args.prefill_chunk < 0:
            raise BundleError("--prefill-chunk must be 0 (one call) or a positive token count")
        bundle = load_bundle(args.bundle)
        chunk = args.prefill_chunk if args.prefill_chunk is not None else bundle.prefill_chunk
        codec = Codec(bundle)
        if args.prompt is not None and not codec.available:
            raise BundleError(f"{args.bundle}: bundle has no tokenizer.json; pass --ids")
        prompt = parse_ids(args.ids) if args.ids is not None else codec.encode(args.prompt)
        loop = StaticLoop(bundle) if bundle.config.get("static_shapes") else DynamicLoop(bundle, chunk)
        new = generate(loop, prompt, args.max_new_tokens, bundle.eos)
    except BundleError as exc:
        print(f"run_bundle: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if codec.available:
        print(codec.decode(new))
    if args.print_ids or not codec.available:
        print("prompt_ids: " + ",".join(map(str, prompt)))
        print("new_ids: " + ",".join(map(str, new)))
    return 0


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    sys.exit(main())
