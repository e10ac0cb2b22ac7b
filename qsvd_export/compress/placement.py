"""Where the torch stage runs: one device (``--device``) or a model split over GPUs (``--device-map``).

A device map is accelerate's: module name → device, inferred (``auto``, ``balanced``, ``balanced_low_0``,
``sequential``: :func:`accelerate.infer_auto_device_map` over the visible GPUs) or read from a JSON file.
accelerate's hooks then move activations between the devices (:func:`accelerate.dispatch_model`). Every
module must sit on a GPU: accelerate treats ``cpu`` and ``disk`` entries as offload (weights swapped in per
call), and offloaded Q/K/V weights carry no gradients. Without GPUs, ``auto``-style maps mean the CPU.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from qsvd_export.errors import RuntimeFailure, UsageError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = dict[str, str]  # module name ("" for the whole model) → torch device name


def check_device(name: str) -> torch.device:
    """The torch device ``name`` names, refused with a one-line error when it is unknown or absent here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"device '{name}' is not supported for the torch stage (cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise RuntimeFailure(f"device '{name}' asked for, but this torch build sees no CUDA GPU")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeFailure(f"device '{name}' asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def read_device_map(spec: str) -> str | DeviceMap:
    """``spec`` as a strategy name, or the map in the JSON file it names (values: cuda:N, N, cpu, disk)."""
    if spec in STRATEGIES:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--device-map: '{spec}' is neither a strategy ({', '.join(STRATEGIES)}) nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--device-map {spec}: not a readable JSON object ({exc})") from None
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in raw.values()):
        raise UsageError(f"--device-map {spec}: expected a JSON object of module name → device (\"cuda:0\", 0, ...)")
    return {str(k): (f"cuda:{v}" if isinstance(v, int) else v) for k, v in raw.items()}


def check_placement(device: str, device_map: str | None) -> str | DeviceMap | None:
    """Check ``--device`` / ``--device-map`` before any model is loaded; returns the read map (or None)."""
    if device_map is not None and device != "cpu":
        raise UsageError("--device and --device-map exclude each other (the map names the devices)")
    check_device(device)
    return read_device_map(device_map) if device_map is not None else None


def resolve_device_map(model: nn.Module, spec: str | DeviceMap) -> DeviceMap:
    """A complete, checked map for ``model``: every module on a visible GPU, or everything on the CPU."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import check_device_map, get_balanced_memory

    if isinstance(spec, str):
        if not torch.cuda.is_available():
            return {"": "cpu"}
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        max_memory = None
        if spec != "sequential":
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split, low_zero=spec == "balanced_low_0")
        device_map = {name: (f"cuda:{d}" if isinstance(d, int) else str(d))
                      for name, d in infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split).items()}
        source = f"'{spec}'"
    else:
        device_map, source = dict(spec), "the given map"
    for name in device_map:
        if name:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise UsageError(f"device map: '{name}' is not a module of this model") from None
    try:
        check_device_map(model, device_map)
    except ValueError as exc:
        raise UsageError(f"device map: {str(exc).splitlines()[0]}") from None
    kinds = {torch.device(d).type if d != "disk" else "disk" for d in device_map.values()}
    if kinds == {"cpu"}:
        return device_map
    offloaded = sorted(name or "(whole model)" for name, d in device_map.items() if d in ("cpu", "disk"))
    if offloaded:
        raise UsageError(f"device map {source} offloads {', '.join(offloaded[:3])}{' ...' if len(offloaded) > 3 else ''} "
                         "to cpu/disk: the torch stage needs every module on a GPU (offloaded weights carry no gradients)")
    for device in set(device_map.values()):
        check_device(device)
    return device_map


@contextmanager
def torch_stage_placement(loaded: Any, device: str, device_map: str | None,
                          reload: Callable[[], Any] | None = None) -> Iterator[None]:
    """Run the block with ``loaded.model`` on ``device`` or split by ``device_map``; afterwards the model is
    back on the CPU: ``reload()`` (a fresh CPU copy, e.g. memory-mapped from its files) replaces it when
    given, else it is copied back."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    spec = check_placement(device, device_map)
    model = loaded.model
    placement = resolve_device_map(model, spec) if spec is not None else {"": device}
    on_gpu = any(torch.device(d).type != "cpu" for d in placement.values())
    if on_gpu and spec is None:
        model.to(device)  # its CPU (memory-mapped) storage is released tensor by tensor
    elif on_gpu:
        dispatch_model(model, device_map=placement)
    try:
        yield
    finally:
        if on_gpu:
            if spec is not None:
                remove_hook_from_submodules(model)
            if reload is None:
                model.to("cpu")
            else:
                loaded.model = model = None  # free the GPU copies before loading the CPU one
            torch.cuda.empty_cache()
            if reload is not None:
                loaded.model = reload()
