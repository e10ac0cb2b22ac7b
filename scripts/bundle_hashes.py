"""Build a fixed set of bundles and record (or check) the SHA-256 of every file they hold.

For behaviour-preserving refactors: record before the first commit, check after the last. Every bundle
is built by the CLI in a fresh process (``python -m qsvd_export ...``), from the tiny families and
smollm2-135m: dense, compressed ``kv=0.5``, graph-only, the cpu/gpu/npu targets, ``--mobile`` and a VLM.

    python scripts/bundle_hashes.py record results/bundle_hashes.json [--work DIR] [--only NAME ...]
    python scripts/bundle_hashes.py check  results/bundle_hashes.json [--work DIR] [--only NAME ...]
        [--expect NAME/FILE=REASON ...]

``check`` exits 1 when a file's hash differs, or a file appears or disappears, unless ``--expect`` names
it with the reason it is meant to change. ``timings.json`` (wall-clock seconds) is never compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEVER_COMPARED = {"timings.json": "wall-clock seconds of each stage"}

# name -> CLI arguments; "{out}" is the bundle folder, "{work}" the work folder (earlier bundles live there).
# Order matters: graph-only entries read an earlier bundle's graph.
BUNDLES: dict[str, list[str]] = {
    "tiny-llama-dense": ["export", "tiny-llama", "-o", "{out}"],
    "tiny-llama-cpu": ["export", "tiny-llama", "--target", "cpu", "-o", "{out}"],
    "tiny-llama-gpu": ["export", "tiny-llama", "--target", "gpu", "-o", "{out}"],
    "tiny-llama-npu": ["export", "tiny-llama", "--target", "npu", "--context-length", "64", "--prefill-length", "16",
                       "-o", "{out}"],
    "tiny-llama-mobile": ["export", "tiny-llama", "--target", "cpu", "--bits", "w8a8", "--mobile", "-o", "{out}"],
    "tiny-llama-rotated": ["export", "tiny-llama", "--rotate", "--target", "cpu", "--bits", "w8a8", "-o", "{out}"],
    "tiny-qwen2-kv50": ["compress", "tiny-qwen2", "--budget", "kv=0.5", "--calib-windows", "4", "-o", "{out}"],
    "tiny-llama-kv50-cpu": ["compress", "tiny-llama", "--budget", "kv=0.5", "--calib-windows", "4", "--target", "cpu",
                            "-o", "{out}"],
    "tiny-llama-kv50-absorbed": ["compress", "tiny-llama", "--budget", "kv=0.5", "--calib-windows", "4",
                                 "--kv-form", "absorbed", "--target", "cpu", "-o", "{out}"],
    "tiny-llama-kv50-npu": ["compress", "tiny-llama", "--budget", "kv=0.5", "--calib-windows", "4", "--target", "npu",
                            "--context-length", "64", "--prefill-length", "16", "-o", "{out}"],
    "tiny-gemma3-params80": ["compress", "tiny-gemma3", "--budget", "params=0.8", "--calib-windows", "4",
                             "-o", "{out}"],
    "tiny-bert-params60": ["compress", "tiny-bert", "--budget", "params=0.6", "--calib-windows", "4", "-o", "{out}"],
    "graph-only-tiny-llama-kv50": ["compile", "{work}/tiny-llama-dense/model.onnx", "--budget", "kv=0.5",
                                   "--calib-windows", "4", "-o", "{out}"],
    "graph-only-tiny-llama-cpu": ["compile", "{work}/tiny-llama-dense/model.onnx", "--target", "cpu", "-o", "{out}"],
    "tiny-idefics3-params80": ["compress", "tiny-idefics3", "--budget", "params=0.8", "--calib-windows", "2",
                               "--target", "cpu", "-o", "{out}"],
    "smollm2-dense": ["export", "smollm2-135m", "-o", "{out}"],
    "smollm2-cpu": ["export", "smollm2-135m", "--target", "cpu", "-o", "{out}"],
    "smollm2-kv50": ["compress", "smollm2-135m", "--budget", "kv=0.5", "--calib-windows", "4", "--grad-windows", "4",
                     "-o", "{out}"],
    "graph-only-smollm2-npu": ["compile", "{work}/smollm2-dense/model.onnx", "--target", "npu", "--no-verify",
                               "-o", "{out}"],
}


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def build(name: str, work: Path) -> dict[str, str]:
    out = work / name
    args = [a.format(out=out, work=work) for a in BUNDLES[name]]
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "qsvd_export", *args, "--overwrite", "-q"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: qsvd-export {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return file_hashes(out)


def compare(recorded: dict[str, dict[str, str]], now: dict[str, dict[str, str]], expect: dict[str, str]) -> list[str]:
    """Lines naming each unexpected difference (empty: byte-identical)."""
    problems = []
    for bundle, files in now.items():
        before = recorded.get(bundle)
        if before is None:
            problems.append(f"{bundle}: not in the record")
            continue
        for rel in sorted(set(before) | set(files)):
            if Path(rel).name in NEVER_COMPARED or f"{bundle}/{rel}" in expect:
                continue
            if rel not in files:
                problems.append(f"{bundle}/{rel}: missing now")
            elif rel not in before:
                problems.append(f"{bundle}/{rel}: new file")
            elif before[rel] != files[rel]:
                problems.append(f"{bundle}/{rel}: bytes differ")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("record_file", type=Path)
    parser.add_argument("--work", type=Path, help="where the bundles are built (default: a temporary folder)")
    parser.add_argument("--only", nargs="+", choices=list(BUNDLES), help="these bundles (and what they read)")
    parser.add_argument("--expect", action="append", default=[], metavar="BUNDLE/FILE=REASON",
                        help="a file that is meant to change, with the reason")
    args = parser.parse_args()
    expect = dict(item.split("=", 1) for item in args.expect)
    names = [n for n in BUNDLES if not args.only or n in args.only
             or any(f"{{work}}/{n}/" in a for o in args.only for a in BUNDLES[o])]
    with tempfile.TemporaryDirectory(prefix="bundle-hashes-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        now = {name: build(name, work) for name in names}
    if args.mode == "record":
        merged = json.loads(args.record_file.read_text()) if args.record_file.exists() else {}
        merged.update(now)
        args.record_file.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(f) for f in now.values())} files of {len(now)} bundles in {args.record_file}")
        return 0
    problems = compare(json.loads(args.record_file.read_text()), now, expect)
    for line in problems:
        print(line)
    for key, reason in expect.items():
        print(f"expected to change: {key} ({reason})")
    print(f"{len(now)} bundles, {sum(len(f) for f in now.values())} files: "
          + ("byte-identical" if not problems else f"{len(problems)} unexpected differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
