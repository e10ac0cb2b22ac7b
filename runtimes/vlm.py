"""Image + prompt → tokens over a VLM bundle: vision graph, embedding graph, decoder graph (models/vlm.py).

Prompts go through the bundle's processor (saved with the bundle: image processor, tokenizer, chat
template): it tiles the image into full frames and writes ``image_seq_len`` image tokens per frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import load_bundle_config
from qsvd_export.errors import BadInputError, UsageError
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.sessions import SessionOptions, create_session


class VisionLanguageRunner:
    """ONNX Runtime sessions over a VLM bundle's three graphs; greedy generation from pixels + token ids."""

    def __init__(self, bundle: str | Path, target: str = "cpu", options: SessionOptions | None = None) -> None:
        self.bundle = Path(bundle)
        self.config = load_bundle_config(self.bundle)
        if self.config.kind != "vlm":
            raise UsageError(f"{bundle}: a {self.config.kind} bundle takes no image")
        vlm = self.config.model_config.get("vlm") or {}
        try:
            self.image_token_id = int(vlm["image_token_id"])
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{bundle}: VLM bundle config has no model_config.vlm.image_token_id") from None
        self.vision = create_session(self.bundle / self.config.graph("vision").filename, target, options)
        self.embed = create_session(self.bundle / self.config.graph("embed").filename, target, options)
        self.decoder = DecoderRunner(self.bundle, target, options)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[frames, 3, S, S] → [frames, image_seq_len, hidden] (float16 for a gpu bundle)."""
        dtype = np.float16 if self.vision.get_inputs()[0].type == "tensor(float16)" else np.float32
        return self.vision.run(None, {"pixel_values": pixel_values.astype(dtype)})[0]

    def embeddings(self, input_ids: np.ndarray) -> np.ndarray:
        """[batch, seq] int64 → [batch, seq, hidden]."""
        return self.embed.run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def prompt_embeddings(self, input_ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
        """Embeddings of one prompt [1, seq] with each frame's features over its block of image tokens."""
        embeds = self.embeddings(input_ids)
        slots = np.flatnonzero(input_ids[0] == self.image_token_id)
        if pixel_values is None:
            if len(slots):
                raise UsageError(f"the prompt has {len(slots)} image tokens but no image was given")
            return embeds
        features = self.image_features(pixel_values)
        if len(slots) != features.shape[0] * features.shape[1]:
            raise BadInputError(f"{len(slots)} image tokens in the prompt for {features.shape[0]} frames × "
                                f"{features.shape[1]} features")
        embeds[0, slots] = features.reshape(-1, features.shape[-1])
        return embeds

    def generate(self, input_ids: list[int], pixel_values: np.ndarray | None, max_new_tokens: int,
                 eos_ids: list[int] | None = None) -> list[int]:
        """Greedy generation; ``pixel_values`` [frames, 3, S, S] (the processor's, batch axis dropped)."""
        prompt = self.prompt_embeddings(np.asarray([input_ids], dtype=np.int64), pixel_values)
        return self.decoder.generate(input_ids, max_new_tokens, eos_ids, prompt=prompt, embed=self.embeddings)


def processor_inputs(processor: Any, image: Any, prompt: str, chat: bool) -> tuple[list[int], np.ndarray]:
    """(input ids, pixel_values [frames, 3, S, S]) for one image and prompt (the vision graph's input). ``chat``: wrap them in the
    processor's chat template (user turn: image, then text; generation prompt added)."""
    if chat and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"{processor.image_token}{prompt}"
    batch = processor(text=text, images=[image], return_tensors="np")
    mask = batch.get("pixel_attention_mask")
    if mask is not None and not np.asarray(mask).all():
        raise BadInputError("the processor padded the image frames; the vision graph takes full frames only")
    pixel_values = np.asarray(batch["pixel_values"], dtype=np.float32)
    if pixel_values.ndim == 5:  # Idefics3: [batch, frames, 3, S, S]; LLaVA: [images, 3, S, S]
        pixel_values = pixel_values[0]
    return [int(i) for i in batch["input_ids"][0]], pixel_values


def read_image(path: Path) -> Any:
    """An RGB PIL image from ``path`` (one-line error when it is missing or not an image)."""
    from qsvd_export.compress.images import open_rgb

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: image file not found")
    return open_rgb(path)
