"""Decode loop over a decoder bundle: dense and latent caches alike, driven by ``qsvd_config.json``.

The loop never assumes a cache layout: it allocates every cache tensor the config lists (zero length on
the sequence axis for prefill), feeds ``present.*`` outputs back as the next step's ``past_*`` inputs,
and grows ``attention_mask`` by the new tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qsvd_export.bundle import BundleConfig, load_bundle_config
from qsvd_export.errors import UsageError
from qsvd_export.runtimes.metrics import window_nll
from qsvd_export.runtimes.sessions import SessionOptions, create_session

Cache = dict[str, np.ndarray]
PREFILL_CHUNK = 512  # prompt tokens per forward where attention is not fused (docs/results.md, prefill in chunks)


def has_fused_attention(model_path: Path) -> bool:
    """Whether the graph runs attention in one fused op (its scores never leave the kernel)."""
    import onnx

    from qsvd_export.passes.find_attention import FUSED_ATTENTION

    graph = onnx.load(model_path, load_external_data=False).graph
    return any(node.op_type in FUSED_ATTENTION for node in graph.node)


def prefill_chunk_for(model_path: Path) -> int | None:
    """Prompt tokens per forward a runtime should feed this decoder graph: :data:`PREFILL_CHUNK` where attention is
    not fused, None (the whole prompt in one forward) where it is. Bundles record it (``qsvd_config.json`` →
    ``prefill_chunk``) for runtimes that cannot read the graph."""
    return None if has_fused_attention(model_path) else PREFILL_CHUNK


class DecoderRunner:
    """One ONNX Runtime session over a bundle's decoder graph (role ``model``: dynamic shapes).

    ``prefill_chunk``: a longer prompt is fed through the growing cache at most this many tokens per forward
    (None: one forward; "auto": :data:`PREFILL_CHUNK` where the graph's attention is not fused, else one forward).
    Unfused attention holds [batch, heads, new, past + new] scores per layer: one forward of 8,192 tokens through the
    smollm2 kv=0.5 latent graph peaks at 8.7 GB (18.5 GB after a second one), chunks of 512 at 2.8 GB, and run
    faster. Fused graphs gain nothing from chunks. The logits are those of one forward up to float rounding."""

    def __init__(self, bundle: str | Path, target: str = "cpu", options: SessionOptions | None = None,
                 prefill_chunk: int | None | str = "auto") -> None:
        if prefill_chunk != "auto" and prefill_chunk is not None and (
                not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise UsageError(f"prefill chunk must be at least 1 token, None or 'auto' (got {prefill_chunk!r})")
        self.bundle = Path(bundle)
        self.config: BundleConfig = load_bundle_config(self.bundle)
        if self.config.kind not in ("decoder", "vlm"):
            raise UsageError(f"{bundle}: a {self.config.kind} bundle has no decode loop")
        spec = self.config.graph("model")
        if prefill_chunk == "auto":
            prefill_chunk = prefill_chunk_for(self.bundle / spec.filename)
        self.prefill_chunk: int | None = prefill_chunk  # type: ignore[assignment]
        self.session = create_session(self.bundle / spec.filename, target, options)
        self.graph_inputs = {i.name for i in self.session.get_inputs()}
        embeds = next((i for i in self.session.get_inputs() if i.name == "inputs_embeds"), None)
        self.embeds_dtype = np.float16 if embeds is not None and embeds.type == "tensor(float16)" else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> Cache:
        cache: Cache = {}
        for layer in self.config.cache:
            for tensor in layer.tensors:
                shape = [batch if d == "batch_size" else 0 if d == "past_sequence_length" else d for d in tensor.shape]
                cache[tensor.input] = np.zeros(shape, dtype=tensor.dtype)  # numpy names
        return cache

    def step(
        self, tokens: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Cache
    ) -> tuple[np.ndarray, Cache]:
        """Run one forward of ``tokens``: ids [batch, seq], or for a VLM decoder ``inputs_embeds``
        [batch, seq, hidden] (cast to the graph's float type). Returns logits [batch, seq, vocab] and the
        next cache."""
        if np.issubdtype(tokens.dtype, np.floating):
            first = {"inputs_embeds": tokens.astype(self.embeds_dtype)}
        else:
            first = {"input_ids": tokens.astype(np.int64)}
        feed = {**first, "attention_mask": attention_mask.astype(np.int64)}
        if "position_ids" in self.graph_inputs:
            feed["position_ids"] = position_ids.astype(np.int64)
        feed.update(cache)
        values = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        present = {t.input: values[t.output] for layer in self.config.cache for t in layer.tensors}
        return values["logits"], present

    def prefill(self, token_ids: np.ndarray) -> tuple[np.ndarray, Cache]:
        """Forward a [batch, seq] block of ids (or [batch, seq, hidden] embeddings) with an empty cache, in
        chunks of ``prefill_chunk`` tokens; returns logits [batch, seq, vocab] and the cache after the block."""
        batch, seq = token_ids.shape[:2]
        if seq < 1:
            raise UsageError("empty prompt: prefill needs at least one token")
        chunk = self.prefill_chunk or seq
        cache, out = self.empty_cache(batch), None
        for start in range(0, seq, chunk):
            stop = min(seq, start + chunk)
            mask = np.ones((batch, stop), dtype=np.int64)
            positions = np.broadcast_to(np.arange(start, stop, dtype=np.int64), (batch, stop - start))
            logits, cache = self.step(token_ids[:, start:stop], mask, positions, cache)
            if stop - start == seq:
                return logits, cache
            if out is None:  # one logits buffer, filled chunk by chunk (no concatenated copy)
                out = np.empty((batch, seq, logits.shape[-1]), dtype=logits.dtype)
            out[:, start:stop] = logits
        return out, cache

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int] | None = None,
                 prompt: np.ndarray | None = None,
                 embed: Callable[[np.ndarray], np.ndarray] | None = None) -> list[int]:
        """Greedy generation for one prompt; returns the new token ids (stops after an EOS id).

        A VLM decoder takes embeddings: ``prompt`` [1, seq, hidden] is the prefill input in place of the ids
        (image features merged in), and ``embed`` maps each new token [[id]] to its embedding [1, 1, hidden]."""
        return list(self.stream(prompt_ids, max_new_tokens, eos_ids, prompt, embed))

    def stream(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int] | None = None,
               prompt: np.ndarray | None = None,
               embed: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[int]:
        """:meth:`generate` as an iterator: yields each new token id as soon as it is chosen (greedy; the EOS id
        is yielded, then the iterator ends). Stopping early skips the remaining decode steps."""
        eos = set(eos_ids or [])
        logits, cache = self.prefill(np.asarray([prompt_ids], dtype=np.int64) if prompt is None else prompt)
        length = len(prompt_ids)
        for step in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            yield token
            if token in eos or step == max_new_tokens - 1:
                break
            mask = np.ones((1, length + 1), dtype=np.int64)
            step_input = np.asarray([[token]], dtype=np.int64)
            logits, cache = self.step(step_input if embed is None else embed(step_input), mask,
                                      np.asarray([[length]]), cache)
            length += 1

    def window_nlls(self, windows: np.ndarray, progress=None) -> list[float]:  # type: ignore[no-untyped-def]
        """Mean NLL per [window_len] row of ``windows`` (each a fresh prefill)."""
        nlls = []
        for row in windows:
            logits, _ = self.prefill(row[None, :])
            nlls.append(window_nll(logits[0], row))
            if progress is not None:
                progress()
        return nlls
