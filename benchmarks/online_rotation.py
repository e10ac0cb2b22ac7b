"""What the online rotations buy: perplexity with the o_proj / down_proj inputs quantized, per rotation setting.

    python -m benchmarks.online_rotation [--model smollm2-135m] [--windows 16] [--length 256] [--json OUT]

Each row quantizes one kind of input — every o_proj's or every down_proj's, the activations the online
rotations exist for — under one rotation setting: none, H1 alone, H1 + that projection's online rotation.
Fake quantization is asymmetric round-to-nearest (:func:`qsvd_export.quant.presets.fake_quant_activation`) at 8
and 4 bits, per token (dynamic, QuaRot's setting) and per tensor (one static range per layer, calibrated
on wiki_calib: the NPU setting); weights and every other activation stay fp32, so a row isolates that
input's quantization error. Perplexity on ``--windows``
× ``--length`` tokens of wiki_eval. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import emit_json_line
from qsvd_export.compress.residual_rotation import rotate_residual_stream
from qsvd_export.data import read_text, token_windows
from qsvd_export.evaluate import torch_window_nlls
from qsvd_export.quant.fake import fake_quant_activation
from qsvd_export.runtimes.metrics import perplexity
from qsvd_export.zoo import load_model

# (quantized input, rotation setting name, (online_mlp, online_o_proj) or None for no rotation)
ROWS = [("o_proj", "none", None), ("o_proj", "H1", (False, False)), ("o_proj", "H1 + online o_proj", (False, True)),
        ("down_proj", "none", None), ("down_proj", "H1", (False, False)),
        ("down_proj", "H1 + online down_proj", (True, False))]


def _linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The Linear of a projection (inside the Sequential an online rotation makes of it)."""
    return module[-1] if isinstance(module, torch.nn.Sequential) else module  # type: ignore[return-value]


def _targets(model: Any, kind: str) -> list[torch.nn.Linear]:
    return [_linear(layer.self_attn.o_proj if kind == "o_proj" else layer.mlp.down_proj) for layer in model.model.layers]


def _static_ranges(model: Any, windows: np.ndarray, kind: str) -> dict[int, tuple[float, float]]:
    """Per target Linear: (min, max) of its input over ``windows``."""
    ranges: dict[int, tuple[float, float]] = {}
    hooks = []
    for linear in _targets(model, kind):
        def record(module: torch.nn.Module, args: tuple, key: int = id(linear)) -> None:
            lo, hi = ranges.get(key, (np.inf, -np.inf))
            ranges[key] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
        hooks.append(linear.register_forward_pre_hook(record))
    with torch.no_grad():
        for row in windows:
            model(input_ids=torch.from_numpy(row[None]))
    for hook in hooks:
        hook.remove()
    return ranges


def _quantized_ppl(model: Any, windows: np.ndarray, kind: str, bits: int, mode: str,
                   ranges: dict[int, tuple[float, float]]) -> float:
    hooks = []
    for linear in _targets(model, kind):
        def quantize(module: torch.nn.Module, args: tuple, key: int = id(linear)) -> tuple:
            x = args[0]
            if mode == "per-token":
                return (fake_quant_activation(x, bits, per_token=True),)
            lo, hi = ranges[key]
            levels = 2**bits - 1
            scale = max(hi - lo, 1e-12) / levels
            zero = round(-lo / scale)
            return ((torch.round(x / scale) + zero).clamp(0, levels).sub(zero).mul(scale),)
        hooks.append(linear.register_forward_pre_hook(quantize))
    try:
        return perplexity(torch_window_nlls(model, windows))
    finally:
        for hook in hooks:
            hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model(args.model)
    rows = token_windows(loaded.tokenizer, read_text("wiki_eval"), args.length, args.windows, source="wiki_eval")
    calibration = token_windows(loaded.tokenizer, read_text("wiki_calib"), args.length, args.calibration_windows,
                                source="wiki_calib")
    start = time.perf_counter()
    result: dict[str, Any] = {"model": args.model, "windows": args.windows, "length": args.length,
                              "rows": []}
    result["fp32"] = round(perplexity(torch_window_nlls(loaded.model, rows)), 3)
    for kind, name, setting in ROWS:
        model = copy.deepcopy(loaded.model).eval()
        if setting is not None:
            rotate_residual_stream(model, args.seed, online_mlp=setting[0], online_o_proj=setting[1])
        ranges = _static_ranges(model, calibration, kind)
        row: dict[str, Any] = {"quantized": f"{kind} inputs", "rotation": name}
        for bits in (8, 4):
            for mode in ("per-tensor", "per-token"):
                row[f"a{bits} {mode}"] = round(_quantized_ppl(model, rows, kind, bits, mode, ranges), 3)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        del model
    result["wall_s"] = round(time.perf_counter() - start, 1)
    emit_json_line(result, args.json)


if __name__ == "__main__":
    main()
