"""Keep the torch stage's resident memory bounded by a few layers (Linux; elsewhere these are no-ops).

Weights loaded from safetensors are memory-mapped: every page a pass reads stays in the process's RSS
until the process ends, so one calibration pass over a 3 GB model holds 3 GB. :class:`LayerResidency`
drops a layer's clean weight pages from the process right after the layer has run (and, for gradient
passes, after its backward): the next use maps them again from the page cache (or the file). Only pages
the kernel reports as file-backed (``/proc/self/pagemap`` bit 61) are dropped, so a weight written in
place (copy-on-write, now anonymous) is never touched and no content can change.

:func:`return_freed_memory` hands memory the allocator keeps after large frees back to the system
(glibc ``malloc_trim``): between passes the torch stage frees hundreds of MB in blocks below glibc's
mmap threshold, which would otherwise stay in the RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from bisect import bisect_right
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

_MADV_DONTNEED = 4
_PRESENT = np.uint64(1 << 63)
_FILE_PAGE = np.uint64(1 << 61)
_PAGE = mmap.PAGESIZE


@lru_cache(maxsize=1)
def _libc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except OSError:  # pragma: no cover - no libc to talk to
        return None


def return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim(0)``; no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every file-backed mapping of this process, sorted by start."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return sorted(spans)


def _mapped_spans(params: list[nn.Parameter], mappings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Page-aligned (start, end) address spans of the CPU storages of ``params`` that lie in a file mapping."""
    starts = [s for s, _ in mappings]
    spans = set()
    for param in params:
        storage = param.untyped_storage()
        if param.device.type != "cpu" or storage.nbytes() == 0:
            continue
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        i = bisect_right(starts, start) - 1
        if i < 0 or end > mappings[i][1]:
            continue  # anonymous memory (computed or copied weights): never released
        spans.add((start // _PAGE * _PAGE, min(-(-end // _PAGE) * _PAGE, mappings[i][1])))
    return sorted(spans)


class LayerResidency:
    """Drops the file-backed weight pages of ``units`` (parameter lists: one per layer, then the rest) on demand."""

    def __init__(self, units: list[list[nn.Parameter]]):
        self.enabled = _libc() is not None
        self.spans: list[list[tuple[int, int]]] = []
        if self.enabled:
            mappings = _file_mappings()
            self.spans = [_mapped_spans(unit, mappings) for unit in units]
            self.enabled = any(self.spans)

    def release(self, unit: int) -> None:
        """Drop unit ``unit``'s resident, file-backed, unmodified weight pages from this process."""
        if not self.enabled:
            return
        libc = _libc()
        with open("/proc/self/pagemap", "rb") as pagemap:
            for start, end in self.spans[unit]:
                pagemap.seek(start // _PAGE * 8)
                flags = np.frombuffer(pagemap.read((end - start) // _PAGE * 8), dtype=np.uint64)
                droppable = ((flags & _PRESENT) != 0) & ((flags & _FILE_PAGE) != 0)
                edges = np.flatnonzero(np.diff(np.concatenate([[0], droppable.view(np.int8), [0]])))
                for first, stop in zip(edges[::2], edges[1::2]):
                    libc.madvise(start + int(first) * _PAGE, int(stop - first) * _PAGE, _MADV_DONTNEED)

    def release_all(self) -> None:
        for unit in range(len(self.spans)):
            self.release(unit)


def decoder_layers(model: nn.Module, attention_parents: list[nn.Module]) -> list[nn.Module]:
    """The model's layer stack (the ``nn.ModuleList`` holding one attention block per entry), or [] if none."""
    wanted = {id(p) for p in attention_parents}
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(attention_parents):
            if all(sum(id(m) in wanted for m in layer.modules()) == 1 for layer in module):
                return list(module)
    return []


@contextmanager
def layer_by_layer(model: nn.Module, attention_parents: list[nn.Module]) -> Iterator[LayerResidency]:
    """Within the block, each decoder layer's mapped weight pages leave the RSS after its forward and, in
    gradient passes, after its backward (when the gradient w.r.t. its input arrives). The caller releases
    everything (embeddings, final norm, head) between windows with ``release_all()``."""
    layers = decoder_layers(model, attention_parents)
    units = [list(layer.parameters()) for layer in layers]
    in_layers = {id(p) for unit in units for p in unit}
    residency = LayerResidency(units + [[p for p in model.parameters() if id(p) not in in_layers]])
    handles = []
    if residency.enabled and layers:
        head = len(layers)

        def after_forward(index: int):  # type: ignore[no-untyped-def]
            return lambda module, args, output: residency.release(index)

        def before_forward(index: int):  # type: ignore[no-untyped-def]
            def after_backward(grad: torch.Tensor) -> None:  # the gradient w.r.t. the layer's input: its backward is done
                residency.release(index)
                if index == head - 1:  # the top layer's backward comes right after the head's
                    residency.release(head)

            def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
                hidden = args[0] if args else kwargs.get("hidden_states")
                if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                    hidden.register_hook(after_backward)
            return hook

        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before_forward(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(after_forward(index)))
    try:
        yield residency
    finally:
        for handle in handles:
            handle.remove()
        residency.release_all()

