"""Inputs for one first forward of a dynamic-shape graph, read off the session's own input list.

Used where no decode loop runs (calibration, parity checks): token inputs from ``ids`` [B, n], cache
inputs empty, image-like float inputs seeded noise.
"""

from __future__ import annotations

from typing import Any, Container

import numpy as np

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def first_step_feed(inputs: list[Any], ids: np.ndarray, cache_inputs: Container[str],
                    rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Feed for ``inputs`` (``session.get_inputs()``): ``input_ids`` = ``ids`` [B, n], ``attention_mask`` ones,
    ``position_ids`` 0…n-1, ``token_type_ids`` zeros; each of ``cache_inputs`` zeros with its symbolic batch
    axis (axis 0) B and every other symbolic axis 0 (an empty past); other float inputs standard-normal
    from ``rng`` with symbolic axes 1. Raises ``ValueError`` naming an input it cannot fill."""
    batch, length = ids.shape
    feed: dict[str, np.ndarray] = {}
    for value in inputs:
        dtype = _FLOAT_TYPES.get(value.type)
        if value.name == "input_ids":
            feed[value.name] = ids.astype(np.int64)
        elif value.name == "attention_mask":
            feed[value.name] = np.ones((batch, length), dtype=np.int64)
        elif value.name == "position_ids":
            feed[value.name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif value.name == "token_type_ids":
            feed[value.name] = np.zeros((batch, length), dtype=np.int64)
        elif dtype is not None and value.name in cache_inputs:
            shape = [d if isinstance(d, int) else (batch if axis == 0 else 0) for axis, d in enumerate(value.shape)]
            feed[value.name] = np.zeros(shape, dtype=dtype)
        elif dtype is not None and rng is not None:
            feed[value.name] = rng.standard_normal([d if isinstance(d, int) else 1 for d in value.shape]).astype(dtype)
        else:
            raise ValueError(f"no input for graph input {value.name} ({value.type})")
    return feed


def sample_feed(inputs: list[Any], sample: np.ndarray, cache_inputs: Container[str]) -> dict[str, np.ndarray]:
    """Feed for one calibration sample of a batch of one: token ids [L] (:func:`first_step_feed`), or an
    image [C, H, W] for the graph's one 4-D float input. Raises ``ValueError`` naming what does not fit."""
    if not np.issubdtype(sample.dtype, np.floating):
        return first_step_feed(inputs, sample[None, :].astype(np.int64), cache_inputs)
    images = [i for i in inputs if i.type in _FLOAT_TYPES and len(i.shape) == 4]
    if len(images) != 1 or len(inputs) != 1:
        raise ValueError(f"image calibration needs a graph whose only input is [batch, C, H, W] float "
                         f"(inputs: {', '.join(i.name for i in inputs)})")
    fixed = [d for d in images[0].shape[1:] if isinstance(d, int)]
    if len(fixed) == 3 and tuple(fixed) != sample.shape:
        raise ValueError(f"image of shape {list(sample.shape)} for input {images[0].name} {list(images[0].shape)}")
    return {images[0].name: sample[None].astype(_FLOAT_TYPES[images[0].type])}
