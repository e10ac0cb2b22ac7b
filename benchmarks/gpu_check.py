"""The gpu target on a real CUDA EP: placement, agreement with the CPU EP, perplexity and decode speed.

    python -m benchmarks.gpu_check BUNDLE [BUNDLE ...] [--text wiki_eval | --windows FILE.npy] [--contexts 512 2048]
        [--new-tokens 64] [--runs 5] [--out results/gpu_check.json]

Per gpu bundle (``--target gpu``, fp16 activations and cache):
- placement: how many nodes ONNX Runtime put on the CUDA EP and which ops it left on the CPU (from the
  session profile);
- agreement: max |Δlogit| and argmax agreement between the CUDA EP and the CPU EP running the same
  graph over a 128-token prefill, and the greedy tokens of both over 16 steps;
- perplexity on the CUDA EP over 32 × 512 tokens of ``--text`` (EVAL.md protocol; bundles with a
  tokenizer), or over ``--windows`` (int64 [count, length] token ids saved with numpy, for machines
  without transformers);
- decode tokens/s after a prompt of each context (cache kept on the GPU with IOBinding, medians of
  ``--runs`` after a warm-up) and achieved ÷ roofline (weights + cache bytes per token over the
  device-to-device copy bandwidth, measured with torch when it is importable).
Needs onnxruntime with the CUDA EP (onnxruntime-gpu); the bundles' graphs run unchanged.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.metrics import perplexity, window_nll
from qsvd_export.runtimes.sessions import SessionOptions

DEVICE = "cuda"  # where IOBinding keeps the cache
TARGET = "gpu"


def placement(bundle: Path) -> dict[str, Any]:
    """Nodes per EP from one profiled prefill on the CUDA EP."""
    with tempfile.TemporaryDirectory() as tmp:
        runner = DecoderRunner(bundle, TARGET, SessionOptions(profile_prefix=str(Path(tmp) / "profile")))
        runner.prefill(np.arange(16)[None] % 200)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_ep = collections.Counter(e["args"]["provider"] for e in kernels)
    cpu_ops = collections.Counter(e["args"]["op_name"] for e in kernels
                                  if e["args"]["provider"] == "CPUExecutionProvider")
    return {"nodes_per_ep": dict(per_ep), "ops_on_cpu": dict(cpu_ops)}


def agreement(gpu: DecoderRunner, cpu: DecoderRunner, windows: np.ndarray) -> dict[str, Any]:
    row = windows[0, :128][None]
    lg, _ = gpu.prefill(row)
    lc, _ = cpu.prefill(row)
    prompt = [int(t) for t in windows[1, :32]]
    return {"max_abs_logit_diff": float(np.abs(lg - lc).max()),
            "argmax_agreement": float(np.mean(lg[0].argmax(-1) == lc[0].argmax(-1))),
            "greedy_tokens_equal": gpu.generate(prompt, 16) == cpu.generate(prompt, 16)}


def decode_rate(runner: DecoderRunner, context: int, new_tokens: int, runs: int) -> float:
    """Tokens/s of greedy decode after a ``context``-token prefill; the cache stays on the GPU."""
    session = runner.session
    cache_names = [(t.input, t.output) for layer in runner.config.cache for t in layer.tensors]
    output_names = ["logits", *(output for _, output in cache_names)]
    prompt = np.random.default_rng(context).integers(0, 200, (1, context))
    rates = []
    for run in range(runs + 1):
        binding = session.io_binding()
        feed = {"input_ids": prompt, "attention_mask": np.ones_like(prompt), "position_ids": np.arange(context)[None],
                **runner.empty_cache(1)}
        for name, array in feed.items():
            if name in runner.graph_inputs:
                binding.bind_cpu_input(name, array)
        length, start = context, 0.0
        for step in range(new_tokens + 1):  # step 0 is the prefill
            binding.bind_output("logits", "cpu")
            for output in output_names[1:]:
                binding.bind_output(output, DEVICE)
            session.run_with_iobinding(binding)
            outputs = dict(zip(output_names, binding.get_outputs()))
            token = int(np.argmax(outputs["logits"].numpy()[0, -1]))
            if step == 0:
                start = time.perf_counter()
            binding = session.io_binding()
            binding.bind_cpu_input("input_ids", np.asarray([[token]], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, length + 1), np.int64))
            if "position_ids" in runner.graph_inputs:
                binding.bind_cpu_input("position_ids", np.asarray([[length]], np.int64))
            for name, output in cache_names:
                binding.bind_ortvalue_input(name, outputs[output])
            length += 1
        if run > 0:  # the first run warms up
            rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def copy_bandwidth() -> float | None:
    """Device-to-device copy bytes/s (read + write) via torch, or None without torch/CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * 2 / min(times[1:])


def check_bundle(bundle: Path, windows: np.ndarray | None, contexts: list[int], new_tokens: int,
                 runs: int, bandwidth: float | None) -> dict[str, Any]:
    gpu = DecoderRunner(bundle, TARGET)
    row: dict[str, Any] = {"bundle": bundle.name, "providers": gpu.session.get_providers(), **placement(bundle),
                           "kv_bytes_per_token": gpu.config.kv_bytes_per_token(),
                           "weight_bytes": (bundle / "model.onnx.data").stat().st_size}
    random_ids = np.random.default_rng(0).integers(0, 200, (2, 128))
    row["agreement_with_cpu_ep"] = agreement(gpu, DecoderRunner(bundle, "cpu"),
                                             windows if windows is not None else random_ids)
    if windows is not None:
        start = time.perf_counter()
        nlls = [window_nll(gpu.prefill(w[None])[0][0], w) for w in windows]
        row["perplexity"] = {"value": perplexity(nlls), "windows": list(windows.shape),
                             "seconds": time.perf_counter() - start}
    for context in contexts:
        rate = decode_rate(gpu, context, new_tokens, runs)
        row[f"decode_{context}_tok_s"] = rate
        if bandwidth:
            bound = bandwidth / (row["weight_bytes"] + context * row["kv_bytes_per_token"])
            row[f"achieved_over_roofline_{context}"] = rate / bound
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--text", default="wiki_eval", help="perplexity text (bundled corpus name or file)")
    parser.add_argument("--windows", type=Path, help="int64 [count, length] token ids (.npy) instead of --text")
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN libraries from the nvidia-* wheels, when present
        ort.preload_dlls()
    fixed = np.load(args.windows) if args.windows else None
    bandwidth = copy_bandwidth()
    result: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                              "copy_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
                              "date": time.strftime("%Y-%m-%d"), "rows": []}
    for bundle in args.bundles:
        windows = fixed
        if windows is None and (bundle / "tokenizer.json").is_file():
            from qsvd_export.bundle import bundle_tokenizer
            from qsvd_export.data import read_text, token_windows

            windows = token_windows(bundle_tokenizer(bundle), read_text(args.text), 512, 32, args.text)
        result["rows"].append(check_bundle(bundle, windows if (bundle / "tokenizer.json").is_file() else None,
                                           args.contexts, args.new_tokens, args.runs, bandwidth))
        print(json.dumps(result["rows"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
