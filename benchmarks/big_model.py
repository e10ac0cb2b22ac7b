"""Big-model memory benchmark (issue 6): a synthetic LLaMA-style model of about 3 GB fp32 through both stages.

    python -m benchmarks.big_model [--work /tmp/qsvd-big] [--layers 12] [--out results/big_model.json]

The model has random weights (structure only: its outputs mean nothing) and smollm2's tokenizer. Each
step runs in its own process, so its peak RSS (``wait4``'s ``ru_maxrss``) is its own:

1. ``make``: writes the model folder (config.json + sharded safetensors + tokenizer); not measured.
2. ``compress``: ``qsvd-export compress FOLDER --budget kv=0.5`` — the torch stage (calibration layer by
   layer), the dense export and the graph stage; its peak RSS is compared with 1.5 × the model's bytes.
3. ``export``: ``qsvd-export export FOLDER`` — the dense ONNX (> 2 GB, external data) the graph stage reads.
4. ``graph``: ``qsvd-export DENSE/model.onnx --plan COMPRESSED`` — the graph stage alone on the > 2 GB
   graph (lazy external tensors in, written one by one out); its peak RSS is compared with 1.5 GB.

Prints one JSON object (also written to ``--out``): model bytes, per step wall time, peak RSS, output sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GB = 1e9


def synthetic_config(layers: int) -> dict[str, Any]:
    """LLaMA-style geometry at about 247 MB per layer plus 403 MB of untied embeddings (fp32)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 49152, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def make_model(folder: Path, config: dict[str, Any], tokenizer: Path | None = None, seed: int = 0) -> int:
    """Write a synthetic LLaMA folder (random weights, atomic) unless it exists; returns its weight bytes.
    ``tokenizer``: a folder whose files are copied in (None: smollm2's tokenizer from the zoo)."""
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})).eval()
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1GB")
        del model
        if tokenizer is None:
            from qsvd_export.zoo import load_model

            load_model("smollm2-135m").tokenizer.save_pretrained(tmp)
        else:
            for path in tokenizer.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measured(name: str, command: list[str], check: bool = True) -> dict[str, Any]:
    """Run ``command`` in its own process; wall seconds, peak RSS (GB) and exit code (``check``: exit on failure)."""
    print(f"[big_model] {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    result = {"command": " ".join(command), "wall_s": round(time.perf_counter() - start, 1),
              "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3), "exit_code": process.returncode}
    if check and process.returncode != 0:
        raise SystemExit(f"[big_model] {name} failed with exit code {process.returncode}")
    return result


def folder_bytes(folder: Path, pattern: str = "*.onnx*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qsvd-big"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("results/big_model.json"))
    parser.add_argument("--steps", nargs="*", default=["compress", "export", "graph"],
                        choices=["compress", "export", "graph"])
    parser.add_argument("--plan", type=Path, default=None,
                        help="plan folder for the graph step (default: the compress step's bundle)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "model"
    if not (model_dir / "config.json").exists():  # in a child: a child's ru_maxrss counts the parent's RSS at fork
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from benchmarks.big_model import "
                        "make_model, synthetic_config; make_model(Path(sys.argv[1]), synthetic_config(int(sys.argv[2])))",
                        str(model_dir), str(args.layers)], check=True)
    model_bytes = make_model(model_dir, synthetic_config(args.layers))
    cli = [sys.executable, "-m", "qsvd_export"]
    compressed, dense, graph = args.work / "compressed", args.work / "dense", args.work / "graph"
    calib = ["--calib-windows", "16", "--calib-length", "256", "--grad-windows", "4"]
    steps = {
        "compress": (cli + ["compress", str(model_dir), "--budget", "kv=0.5", *calib, "--output", str(compressed),
                            "--overwrite"], 1.5 * model_bytes / GB),
        "export": (cli + ["export", str(model_dir), "--output", str(dense), "--overwrite"], None),
        "graph": (cli + [str(dense / "model.onnx"), "--plan", str(args.plan or compressed), "--output", str(graph), "--overwrite"], 1.5),
    }
    result: dict[str, Any] = {"model": f"synthetic LLaMA {args.layers} layers, hidden 2048, GQA 16/4, mlp 5632",
                              "model_bytes": model_bytes, "steps": {}}
    for name in args.steps:
        command, limit_gb = steps[name]
        step = measured(name, command)
        if limit_gb is not None:
            step["limit_gb"] = round(limit_gb, 3)
            step["within_limit"] = step["peak_rss_gb"] < limit_gb
        out_dir = {"compress": compressed, "export": dense, "graph": graph}[name]
        step["output_onnx_bytes"] = folder_bytes(out_dir)
        result["steps"][name] = step
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
