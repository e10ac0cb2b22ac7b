"""Prefill latency, decode speed, memory and roofline of decoder bundles, side by side (EVAL.md).

    python -m benchmarks.decode_speed BUNDLE [BUNDLE ...] [--contexts 512 2048] [--runs 5] [--threads 2]

Per bundle (each in its own subprocess so peak RSS is its own): prefill latency for a 512-token
prompt; decode tokens/s generating ``--new-tokens`` tokens after a prompt of each context length;
peak resident memory; weight bytes. Medians of ``--runs`` timed runs after one warm-up; every run's decode
rate is kept as well (``decode_<context>_tok_s_runs``, printed as [min–max]), so a bimodal speed shows. The memory
bandwidth is measured in the same run (numpy copy) and gives the decode roofline: bytes read per token
(weights + cache at that context) ÷ bandwidth, reported as achieved ÷ bound. Weights read per token are
the graph's initializer bytes, except that a table read only by ``Gather`` (an untied embedding) counts
one row per token (:func:`weight_bytes_read_per_token`). The first bundle is the baseline for the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def measure_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large array copy (read + write counted)."""
    count = int(gigabytes * 1e9 / 8)
    a = np.ones(count, dtype=np.float64)
    b = np.empty_like(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / min(times)


def weight_bytes_read_per_token(graph: Path) -> int:
    """Initializer bytes one decode step reads: every weight in full, but a table whose only readers
    are ``Gather`` nodes on axis 0 (an embedding not tied to the lm_head) one row per Gather."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    proto = onnx.load(str(graph), load_external_data=False)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    total = 0
    for tensor in proto.graph.initializer:
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        nodes = readers.get(tensor.name, [])
        gathered = nodes and all(n.op_type == "Gather" and n.input[0] == tensor.name
                                 and all(a.name != "axis" or a.i == 0 for a in n.attribute) for n in nodes)
        total += len(nodes) * nbytes // max(1, tensor.dims[0]) if gathered and tensor.dims else nbytes
    return total


def _prompt(runner, length: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(length)
    vocab = int(runner.config.model_config.get("vocab_size", 256))
    return rng.integers(0, vocab, (1, length))


def worker(bundle: Path, contexts: list[int], new_tokens: int, runs: int, threads: int,
           prefill_length: int = 512) -> dict:
    """One bundle's figures (run in its own process): prefill latency of a ``prefill_length`` prompt,
    decode tokens/s after each context, peak RSS; ``started`` (wall clock) lets the caller check the order."""
    from qsvd_export.runtimes.decode import DecoderRunner
    from qsvd_export.runtimes.sessions import SessionOptions

    started = time.time()
    runner = DecoderRunner(bundle, "cpu", SessionOptions(threads=threads))
    result: dict = {"bundle": str(bundle), "started": started,
                    "weight_bytes": (bundle / "model.onnx.data").stat().st_size,
                    "weight_bytes_read_per_token": weight_bytes_read_per_token(bundle / "model.onnx"),
                    "kv_bytes_per_token": runner.config.kv_bytes_per_token()}
    prompt = _prompt(runner, prefill_length)
    runner.prefill(prompt)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.prefill(prompt)
        times.append(time.perf_counter() - start)
    result[f"prefill_{prefill_length}_ms"] = 1000 * statistics.median(times)
    for context in contexts:
        prompt = _prompt(runner, context)
        rates = []
        for run in range(runs + 1):
            logits, cache = runner.prefill(prompt)
            length = context
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = np.asarray([[int(np.argmax(logits[0, -1]))]])
                logits, cache = runner.step(token, np.ones((1, length + 1)), np.asarray([[length]]), cache)
                length += 1
            if run > 0:  # the first run warms up
                rates.append(new_tokens / (time.perf_counter() - start))
        result[f"decode_{context}_tok_s"] = statistics.median(rates)
        result[f"decode_{context}_tok_s_runs"] = rates
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the bundle sequence this many times (interleaved) and take medians: "
                             "machine speed drifts, interleaving spreads the drift over all bundles")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("results/decode_speed.json"))
    parser.add_argument("--prefill-length", type=int, default=512, help="prompt tokens of the prefill timing")
    parser.add_argument("--bandwidth-gb", type=float, default=1.0,
                        help="size of the array the bandwidth copy moves (tests use a small one)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.bundles[0], args.contexts, args.new_tokens, args.runs, args.threads,
                                args.prefill_length)))
        return
    samples: list[list[dict]] = [[] for _ in args.bundles]
    for _ in range(args.rounds):
        for i, bundle in enumerate(args.bundles):
            cmd = [sys.executable, "-m", "benchmarks.decode_speed", str(bundle), "--worker", "--contexts",
                   *map(str, args.contexts), "--new-tokens", str(args.new_tokens), "--runs", str(args.runs),
                   "--threads", str(args.threads), "--prefill-length", str(args.prefill_length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            samples[i].append(json.loads(out))
    rows = []
    for runs in samples:
        row = dict(runs[0])
        for key in row:
            if key.endswith("_runs"):  # every timed run of every round, in order: the spread behind the median
                row[key] = [rate for r in runs for rate in r[key]]
            elif key.startswith(("decode_", "prefill_", "peak_rss")):
                row[key] = statistics.median(r[key] for r in runs)
        row["rounds"] = len(runs)
        row["started"] = [r["started"] for r in runs]  # one wall-clock start per round: the interleaving
        rows.append(row)
    # Measured after the workers: ru_maxrss survives exec, so the big copy must not precede them.
    bandwidth = measure_bandwidth(args.bandwidth_gb)
    for row in rows:
        for context in args.contexts:
            bytes_per_token = row["weight_bytes_read_per_token"] + context * row["kv_bytes_per_token"]
            bound = bandwidth / bytes_per_token
            row[f"roofline_{context}_tok_s"] = bound
            row[f"achieved_over_roofline_{context}"] = row[f"decode_{context}_tok_s"] / bound
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["ratios"] = {k: row[k] / base[k] for k in row
                         if k.startswith(("decode_", "prefill_")) and not k.endswith("_runs") and base.get(k)}
    result = {"machine": f"{platform.machine()}, {args.threads} threads", "bandwidth_gb_s": bandwidth / 1e9,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = ["bundle", f"prefill{args.prefill_length} ms", *(f"decode@{c} tok/s" for c in args.contexts),
              "RSS MB", "KV B/tok"]
    print(" | ".join(header))
    for row in rows:
        cells = [Path(row["bundle"]).name, f"{row[f'prefill_{args.prefill_length}_ms']:.0f}"]
        cells += [f"{row[f'decode_{c}_tok_s']:.1f} [{min(row[f'decode_{c}_tok_s_runs']):.1f}–"
                  f"{max(row[f'decode_{c}_tok_s_runs']):.1f}] ({row['ratios'][f'decode_{c}_tok_s']:.2f}x, "
                  f"{row[f'achieved_over_roofline_{c}']:.2f} of roofline)" for c in args.contexts]
        cells += [f"{row['peak_rss_mb']:.0f}", str(row["kv_bytes_per_token"])]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
