"""Dev-split perplexity of a latent bundle's cache at fewer code levels (int8 storage, static per-channel scales).

    python scripts/latent_cache_bits_probe.py LATENT_BUNDLE [--levels 127 7] [--clips 1.0 0.8] [--windows 8]
                                              [--json OUT]

For each (levels, clip) the bundle's fp graph gets the cpu target's latent cache pass with
scale = clip · max|latent| / levels (max over 32 × 512 calibration tokens of wiki_calib) and codes saturated at
±levels, so ``levels`` 7 is the grid of symmetric int4 codes; clip "mse" is the per-channel clip the 4-bit cache
uses (``mse_scales``). Scored on the dev split (the last windows of wiki_calib, never calibrated on). The codes stay
one per byte here (the packed 4-bit cache holds the same values: ``--kv-bits 4``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from qsvd_export.bundle import bundle_tokenizer, load_bundle_config
    from qsvd_export.data import dev_windows, read_text, token_windows
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.metrics import perplexity
    from qsvd_export.targets.latent_cache import (
        latent_samples, latent_tensor_names, mse_scales, quantize_latent_cache, scales_for)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--levels", type=int, nargs="+", default=[127, 7])
    parser.add_argument("--clips", nargs="+", default=["1.0", "0.8", "mse"], help="fractions of the peak, or mse")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tokenizer = bundle_tokenizer(args.bundle)
    config = load_bundle_config(args.bundle)
    names = latent_tensor_names(config)
    calib = token_windows(tokenizer, read_text("wiki_calib"), 512, 32, source="wiki_calib")
    samples = latent_samples(args.bundle, names, calib)
    peaks = {name: np.abs(values).max(axis=0) for name, values in samples.items()}
    rows = dev_windows(tokenizer, args.windows)
    float_ppl = perplexity(DecoderRunner(args.bundle).window_nlls(rows))
    results = [{"levels": None, "clip": None, "perplexity": round(float_ppl, 4)}]
    print(f"float: {results[0]['perplexity']}", file=sys.stderr, flush=True)
    for levels in args.levels:
        for clip in args.clips:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "bundle"
                shutil.copytree(args.bundle, folder)
                scales = mse_scales(samples, levels) if clip == "mse" else scales_for(peaks, levels, float(clip))
                quantize_latent_cache(folder, load_bundle_config(folder), None, scales=scales, levels=levels)
                ppl = perplexity(DecoderRunner(folder).window_nlls(rows))
            results.append({"levels": levels, "clip": clip if clip == "mse" else float(clip), "saturated": True,
                            "perplexity": round(ppl, 4), "ratio_to_float": round(ppl / results[0]["perplexity"], 4)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = json.dumps({"bundle": str(args.bundle), "text": "dev", "windows": args.windows,
                       "calibration": "32 x 512 wiki_calib", "rows": results}, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
