"""Calibration samples for a vision-language model's torch stage: one image + one text window each.

Sample i = the processor's prompt for image i mod n (``<image>``: fake/global tokens and
``image_seq_len`` image tokens per frame) followed by text window i of the calibration text. Images are
center-cropped to squares first, so every image gives the same frames and every row the same length.
The loss is next-token cross-entropy on the text part only, so its gradients reach the vision tower
through the image features the text attends to: both towers are scored by one loss, under one budget.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsvd_export.compress.images import read_images
from qsvd_export.data import read_text, resolve_text, token_windows
from qsvd_export.errors import BadInputError, UsageError

# skimage.data images that ship inside scikit-image (no download)
SKIMAGE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "cat", "brick")
IGNORE = -100  # label of positions the loss skips


def _square(image: Any) -> Any:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def calibration_images(folder: Path | None, count: int) -> tuple[list[Any], dict[str, Any]]:
    """Up to ``count`` square RGB PIL images: the files of ``folder`` (sorted by name), else the bundled
    ``skimage.data`` samples. Returns (images, source record with a content hash)."""
    from PIL import Image

    if folder is not None:
        images, digest = read_images(Path(folder), count)
        return [_square(image) for image in images], {"images": Path(folder).name, "count": len(images),
                                                       "sha256": digest}
    try:
        from skimage import data as samples
    except ImportError:
        raise UsageError("a vision-language model calibrates on images: give --calib-images DIR "
                         "(or install scikit-image for its bundled sample images)") from None
    names = SKIMAGE_IMAGES[:count]
    hasher = hashlib.sha256()
    images = []
    for name in names:
        pixels = np.asarray(getattr(samples, name)())
        hasher.update(pixels.tobytes())
        images.append(_square(Image.fromarray(pixels.astype(np.uint8)).convert("RGB")))
    return images, {"images": "skimage.data: " + ", ".join(names), "count": len(images),
                    "sha256": hasher.hexdigest()}


def vlm_calibration(processor: Any, options: Any) -> tuple[np.ndarray, list[dict[str, torch.Tensor]], dict[str, Any]]:
    """(rows [n, L] int64, model kwargs per row, source record) for ``options.calib_windows`` samples of
    ``options.calib_length`` text tokens after the image prompt. Each kwargs dict holds ``input_ids``,
    ``attention_mask`` [1, L] and ``pixel_values`` [1, frames, 3, S, S]; the source record's
    ``prompt_length`` is the image prompt's length (the loss skips it)."""
    images, image_source = calibration_images(options.calib_images, options.calib_windows)
    text_path = resolve_text(options.calib_text)
    windows = token_windows(processor.tokenizer, read_text(options.calib_text), options.calib_length,
                            options.calib_windows, source=options.calib_text)
    prompts = []
    for image in images:
        batch = processor(text=processor.image_token, images=[image], return_tensors="pt")
        mask = batch.get("pixel_attention_mask")
        if mask is not None and not bool(mask.all()):
            raise BadInputError("the processor padded a calibration image's frames; the vision graph takes full frames")
        prompts.append((batch["input_ids"][0], batch["pixel_values"]))
    if len({len(ids) for ids, _ in prompts}) != 1:
        raise AssertionError("square calibration images gave prompts of different lengths")
    rows, batches = [], []
    for i, window in enumerate(windows):
        prefix, pixel_values = prompts[i % len(prompts)]
        ids = torch.cat([prefix, torch.from_numpy(np.asarray(window, dtype=np.int64))])[None]
        rows.append(ids[0].numpy())
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values})
    source = {"text": str(options.calib_text), "sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
              "images": image_source, "prompt_length": len(prompts[0][0])}
    return np.stack(rows), batches, source


def vlm_loss(batches: list[dict[str, torch.Tensor]], prompt_length: int) -> Any:
    """A ``LossFn`` for ``for_each_gradient``: row ``index``'s image + text (``ids``), next-token
    cross-entropy on the text tokens only (the first ``prompt_length`` positions are the image prompt)."""
    def loss(model: torch.nn.Module, ids: torch.Tensor, index: int) -> torch.Tensor:
        labels = ids.clone()
        labels[:, :prompt_length] = IGNORE
        return model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     pixel_values=batches[index]["pixel_values"].to(ids.device), labels=labels,
                     use_cache=False).loss
    return loss
