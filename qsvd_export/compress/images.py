"""Calibration images (``--calib-images DIR``): files → normalised ``pixel_values`` for vision graphs, and the
file reading shared by VLM calibration and ``run --image`` (:func:`read_images`, :func:`open_rgb`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.errors import BadInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# ImageNet statistics: what most vision encoders (DINOv2, CLIP-like, ResNets) were trained with
DEFAULT_MEAN, DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalization(folders: list[Path]) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from): ``image_mean``/``image_std`` of the first ``preprocessor_config.json`` in
    ``folders``, else the ImageNet statistics."""
    for folder in folders:
        path = folder / "preprocessor_config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text())
                return tuple(config["image_mean"]), tuple(config["image_std"]), str(path.name)
            except (ValueError, KeyError, TypeError):
                raise BadInputError(f"{path}: no image_mean / image_std lists") from None
    return DEFAULT_MEAN, DEFAULT_STD, "ImageNet default"


def open_rgb(path: Path) -> Any:
    """The image at ``path`` as a loaded RGB PIL image. Raises :class:`BadInputError` if it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def read_images(folder: Path, count: int) -> tuple[list[Any], str]:
    """Up to ``count`` images of ``folder`` (sorted by name) as RGB PIL images, and the sha256 of their
    bytes. Raises :class:`BadInputError` for a missing or image-less folder, or a file that is not an image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"--calib-images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise BadInputError(f"--calib-images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return [open_rgb(path) for path in files], digest.hexdigest()


def image_samples(folder: Path, height: int, width: int, count: int, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """Up to ``count`` images of ``folder`` (sorted by name) as float32 [n, 3, height, width]: RGB, resized
    (bicubic), scaled to [0, 1], then (x - mean) / std per channel. Returns (samples, source record).
    Raises :class:`BadInputError` for a missing or image-less folder, or a file that is not an image."""
    from PIL import Image

    images, digest = read_images(folder, count)
    samples = []
    for rgb in images:
        pixels = np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        samples.append(pixels.transpose(2, 0, 1))
    source = {"images": folder.name, "count": len(images), "sha256": digest,
              "size": [height, width], "mean": list(mean), "std": list(std)}
    return np.stack(samples).astype(np.float32), source
