"""Dev-split re-run of the cpu target's two weight rules (issue 23 item 6): the lm_head kept at 8 bits under 4-bit
weights (``TargetPolicy.output_matmul_bits``) and no MatMulNBits block range search (``weight_range_grid``).

    python scripts/dev_cpu_weight_rules.py DENSE_BUNDLE --work DIR [--bits w4a8] [--windows 8] [--json OUT]

Each variant is the cpu policy's own ``quantize`` hook (one field changed) on the dense bundle's graph, unfused
attention (weights only differ), written beside a copy of the dense bundle's config and tokenizer. Perplexity:
``benchmarks.bundle_perplexity`` on the dev split and on wiki_eval (same windows count), dense first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed

from qsvd_export.quant.matmul_nbits import RANGE_GRID  # noqa: E402 - block range shrinks 1.0 … 0.5 (the stop-19 search)

VARIANTS = {  # name -> TargetPolicy field overrides
    "default": {},
    "lm_head_low_bits": {"output_matmul_bits": None},
    "range_search": {"weight_range_grid": RANGE_GRID},
}


def build(dense: Path, out: Path, bits: str, overrides: dict) -> dict:
    import onnx_ir as ir

    from benchmarks.run import copy_bundle_files
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.quant.presets import parse_bits
    from qsvd_export.targets.cpu import CPU

    policy = dataclasses.replace(CPU, **overrides)
    model = load_onnx(dense / "model.onnx")
    report = policy.quantize(model, parse_bits(bits), plain_causal=False)
    if out.exists():
        shutil.rmtree(out)
    copy_bundle_files(dense, out)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    kept = ("quantized_matmuls", "packed_weight_bytes", "block_size", "accuracy_level")
    return {k: v for k, v in report.items() if k in kept or k.startswith("output_")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--bits", default="w4a8")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    built, result = {}, {"dense": str(args.dense), "bits": args.bits, "windows": args.windows, "variants": {}}
    for name in args.variants:
        built[name] = args.work / f"{args.bits}-{name}"
        result["variants"][name] = {"overrides": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in VARIANTS[name].items()},
                                    "build": build(args.dense, built[name], args.bits, VARIANTS[name])}
    for text in ("dev", "wiki_eval"):
        out = args.work / f"ppl_{text}.json"
        subprocess.run([sys.executable, "-m", "benchmarks.bundle_perplexity", str(args.dense),
                        *map(str, built.values()), "--text", text, "--windows", str(args.windows), "--json", str(out)],
                       check=True, cwd=ROOT)
        result[text] = json.loads(out.read_text())
    text = json.dumps(result, indent=1) + "\n"
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
