"""The torch stage on a CUDA GPU (``compress --device cuda``) against the CPU, on synthetic LLaMA models.

    python -m benchmarks.torch_stage_device --tokenizer TOKENIZER_DIR [--work /tmp/qsvd-device]
        [--compare-layers 4 --compare-hidden 1024] [--big-layers 12] [--out results/torch_stage_device.json]

1. ``compare``: one small synthetic model (random weights, ``--compare-*`` geometry) through
   ``compress_model`` on the CPU and on the GPU with the same calibration windows (wiki_calib) and
   budget: ranks per layer, the largest relative difference of the plan's factors, wall times.
   ``map``: the same model and windows against ``--device-map`` (accelerate; ``auto`` by default).
2. ``big``: ``qsvd-export compress BIG --budget kv=0.5 --device cuda`` on the ~3 GB model of
   ``benchmarks.big_model`` (its geometry, random weights) in its own process: host peak RSS
   (``wait4``) against the model's bytes, wall time, exit code. The export and graph stage run on the CPU.

``TOKENIZER_DIR`` holds a tokenizer (e.g. smollm2's tokenizer.json + tokenizer_config.json); the models use
its vocabulary. Prints one JSON object and writes it to ``--out``. Without a CUDA GPU both sides run on the
CPU (``--device cpu``), which only checks the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.big_model import GB, make_model, measured, synthetic_config


def compare(folder: Path, device: str, device_map: str | None = None) -> dict[str, Any]:
    """compress_model on the CPU and on ``device`` (or split by the accelerate ``device_map``) with the same
    windows; plan agreement and times."""
    import torch

    from qsvd_export.compress.budget import parse_budget
    from qsvd_export.compress.compressor import compress_model
    from qsvd_export.compress.options import CompressOptions
    from qsvd_export.zoo import load_model

    loaded = load_model(str(folder))
    plans, seconds = {}, {}
    if device_map is not None:
        device, placement = f"map:{device_map}", {"device_map": device_map}
    else:
        placement = {"device": device}
    for name, where in (("cpu", {"device": "cpu"}), (device, placement)):
        options = CompressOptions(budget=parse_budget("kv=0.5"), calib_windows=16, calib_length=256, grad_windows=4,
                                  **where)
        start = time.perf_counter()
        plans[name] = compress_model(loaded, options)
        seconds[name] = round(time.perf_counter() - start, 1)
    cpu = plans["cpu"]
    ranks = {name: [[g.rank for g in layer.groups] for layer in plan.layers] for name, plan in plans.items()}
    worst = 0.0
    if ranks["cpu"] == ranks[device]:
        for layer in cpu.layers:
            for group in layer.groups:
                for m in group.members:
                    # factors are defined up to each component's sign: compare the products up_m · down
                    product = {name: plan.tensors[plan.tensor_name(layer.layer, group.members, f"up_{m}")]
                               @ plan.tensors[plan.tensor_name(layer.layer, group.members, "down")]
                               for name, plan in plans.items()}
                    diff = (product[device] - product["cpu"]).norm() / product["cpu"].norm().clamp_min(1e-30)
                    worst = max(worst, float(diff))
    return {"device": device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "ranks_cpu": ranks["cpu"], "ranks_device": ranks[device], "ranks_equal": ranks["cpu"] == ranks[device],
            "max_rel_product_diff": worst, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qsvd-device"))
    parser.add_argument("--compare-layers", type=int, default=4)
    parser.add_argument("--compare-hidden", type=int, default=1024)
    parser.add_argument("--big-layers", type=int, default=12)
    parser.add_argument("--steps", nargs="*", default=["compare", "big"], choices=["compare", "map", "big"])
    parser.add_argument("--device-map", default="auto", help="the map step's accelerate device map")
    parser.add_argument("--out", type=Path, default=Path("results/torch_stage_device.json"))
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if "compare" in args.steps or "map" in args.steps:
        small = synthetic_config(args.compare_layers)
        small.update(hidden_size=args.compare_hidden, intermediate_size=args.compare_hidden * 11 // 4,
                     num_attention_heads=args.compare_hidden // 128, num_key_value_heads=max(1, args.compare_hidden // 512))
        folder = args.work / "compare-model"
        result["compare_model_bytes"] = make_model(folder, small, args.tokenizer)
        if "compare" in args.steps:
            result["compare"] = compare(folder, device)
            print(json.dumps(result["compare"]), file=sys.stderr, flush=True)
        if "map" in args.steps:
            result["map"] = compare(folder, device, args.device_map)
            print(json.dumps(result["map"]), file=sys.stderr, flush=True)
    if "big" in args.steps:
        folder = args.work / "big-model"
        model_bytes = make_model(folder, synthetic_config(args.big_layers), args.tokenizer)
        command = [sys.executable, "-m", "qsvd_export", "compress", str(folder), "--budget", "kv=0.5",
                   "--calib-windows", "16", "--calib-length", "256", "--grad-windows", "4", "--device", device,
                   "--output", str(args.work / "big-compressed"), "--overwrite"]
        step = measured("big compress", command, check=False)
        step.update(model_bytes=model_bytes, limit_gb=round(1.5 * model_bytes / GB, 3))
        step["within_limit"] = step["peak_rss_gb"] < step["limit_gb"]
        result["big"] = step
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
