"""Graph-only plans against the torch stage at the same budget (issue 7's must-show).

    python -m benchmarks.graph_only_quality --only minilm [--r1 0.6] [--work DIR]
    python -m benchmarks.graph_only_quality --only smollm2 --dense DENSE [--torch-plan PLAN] [--budget kv=0.5]

minilm-l6: the model exported by torch's legacy TorchScript exporter (``dynamo=False``, opset 17,
``input_ids, attention_mask → last_hidden_state``) into a bare folder (no bundle), then

- graph-only: ``qsvd-export legacy.onnx --budget params=R1 --tokenizer MODEL_DIR --calib TEXT`` (the graph's
  own gradients), and the same with ``--grad-windows 0`` (gradient-free);
- torch stage: ``qsvd-export compress minilm-l6 --budget params=R1 --calib TEXT``, applied to the same legacy
  graph with ``--plan``;

scored by the mean cosine of mean-pooled, L2-normalised sentence embeddings against the legacy graph
itself over the first 256 ``news_eval`` sentences (EVAL.md), in ONNX Runtime. Two calibration texts:
``wiki_calib`` (EVAL.md's) and the ``news_eval`` text *after* those 256 sentences (the issue asks for
news sentences; EVAL.md forbids calibrating on evaluated text, so the two never overlap).

smollm2-135m: ``qsvd-export DENSE/model.onnx --budget B`` (graph gradients) and ``--grad-windows 0``,
against the torch-stage plan ``compress smollm2-135m --budget B`` (``--torch-plan`` reuses one) applied to
the same graph; wiki_eval perplexity (32 × 512) of each.

Writes ``--out`` JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

EVAL_SENTENCES = 256


def legacy_export(model: Any, path: Path, opset: int = 17) -> None:
    """``model`` (an HF encoder) through torch's TorchScript exporter: input_ids, attention_mask → last_hidden_state."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]

    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"}}
    example = (torch.randint(0, 1000, (1, 8)), torch.ones(1, 8, dtype=torch.long))
    torch.onnx.export(LastHidden(model), example, str(path), dynamo=False, opset_version=opset,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes=axes)


def onnx_sentence_embeddings(graph: Path, tokenizer: Any, sentences: list[str], batch: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings [n, H] of ``sentences`` from an encoder graph in ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out = []
    for start in range(0, len(sentences), batch):
        enc = tokenizer(sentences[start:start + batch], padding=True, truncation=True, max_length=128, return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        hidden = session.run(None, feed)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))
    return np.concatenate(out)


def _cli(args: list[str]) -> float:
    from qsvd_export.cli import main

    start = time.perf_counter()
    code = main([*args, "-q"])
    if code != 0:
        raise SystemExit(f"qsvd-export {' '.join(args)} exited {code}")
    return round(time.perf_counter() - start, 1)


def minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from qsvd_export.data import read_text
    from qsvd_export.evaluate import embedding_cosine, eval_sentences
    from qsvd_export.plan.io import load_plan
    from qsvd_export.zoo import load_model

    work = args.work / "minilm"
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model("minilm-l6")
    model_dir = loaded.weights_dir
    assert model_dir is not None
    legacy = work / "legacy" / "model.onnx"
    if not legacy.exists():
        legacy.parent.mkdir(parents=True, exist_ok=True)
        legacy_export(loaded.model, legacy)
    del loaded  # the TorchScript exporter leaves the traced model altered: the torch stage loads a fresh one
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    news = read_text("news_eval")
    sentences = eval_sentences(news, EVAL_SENTENCES)
    held_out = work / "news_heldout.txt"
    held_out.write_text(news[news.index(sentences[-1]) + len(sentences[-1]):])
    reference = onnx_sentence_embeddings(legacy, tokenizer, sentences)
    rows = []
    for calib_name, calib in (("wiki_calib", "wiki_calib"), ("news_eval after the eval sentences", str(held_out))):
        tag = "wiki" if calib == "wiki_calib" else "news"
        for r1 in args.r1:
            budget = f"params={r1}"
            variants = {
                "graph-only, graph gradients": ["--budget", budget, "--tokenizer", str(model_dir), "--calib", calib],
                "graph-only, gradient-free (--grad-windows 0)": ["--budget", budget, "--tokenizer", str(model_dir),
                                                                "--calib", calib, "--grad-windows", "0"],
            }
            plan_dir = work / f"plan-{tag}-{r1}"
            seconds = {}
            if not (plan_dir / "plan.json").exists():
                seconds["torch stage plan"] = _cli(["compress", "minilm-l6", "--budget", budget, "--calib", calib,
                                                    "-o", str(plan_dir), "--overwrite"])
            variants["torch stage plan on the legacy graph"] = ["--plan", str(plan_dir)]
            for label, flags in variants.items():
                out = work / f"{tag}-{r1}-{len(rows)}"
                wall = _cli([str(legacy), *flags, "-o", str(out), "--overwrite"])
                embeddings = onnx_sentence_embeddings(out / "model.onnx", tokenizer, sentences)
                plan = load_plan(plan_dir if "--plan" in flags else out)
                rows.append({"model": "minilm-l6 (legacy TorchScript export, opset 17)", "calibration": calib_name,
                             "method": label, "budget": budget, "r1": plan.r1, "importance": plan.method["importance"],
                             "whitening": plan.method["whitening"], "sentences": len(sentences),
                             "cosine": round(embedding_cosine(reference, embeddings), 4),
                             "seconds": wall + seconds.get("torch stage plan", 0.0) * ("--plan" in flags)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def smollm2(args: argparse.Namespace) -> list[dict[str, Any]]:
    from qsvd_export.bundle import bundle_tokenizer
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.plan.io import load_plan
    from qsvd_export.runtimes.decode import DecoderRunner

    if args.dense is None:
        raise SystemExit("--only smollm2 needs --dense DIR (qsvd-export export smollm2-135m -o DIR)")
    work = args.work / "smollm2"
    work.mkdir(parents=True, exist_ok=True)
    graph = args.dense / "model.onnx"
    plan_dir = args.torch_plan or work / "torch-plan"
    seconds = {}
    if not (plan_dir / "plan.json").exists():
        seconds["torch"] = _cli(["compress", "smollm2-135m", "--budget", args.budget, "-o", str(plan_dir), "--overwrite"])
    variants = {
        "graph-only, graph gradients": ["--budget", args.budget],
        "graph-only, gradient-free (--grad-windows 0)": ["--budget", args.budget, "--grad-windows", "0"],
        "torch stage plan on the same graph": ["--plan", str(plan_dir)],
    }
    windows = token_windows(bundle_tokenizer(args.dense), read_text("wiki_eval"), 512, args.windows, source="wiki_eval")
    rows = []
    for index, (label, flags) in enumerate(variants.items()):
        out = work / f"v{index}"
        wall = _cli([str(graph), *flags, "-o", str(out), "--overwrite"])
        nlls = DecoderRunner(out).window_nlls(windows)
        plan = load_plan(plan_dir if "--plan" in flags else out)
        rows.append({"model": "smollm2-135m", "method": label, "budget": args.budget, "r1": plan.r1, "r2": plan.r2,
                     "importance": plan.method["importance"], "whitening": plan.method["whitening"],
                     "wiki_eval_ppl": round(float(np.exp(np.mean(nlls))), 3), "windows": args.windows,
                     "seconds": wall})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["minilm", "smollm2"], required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qsvd-graph-only"))
    parser.add_argument("--out", type=Path, default=None, help="JSON of the rows (default WORK/ONLY.json)")
    parser.add_argument("--r1", type=float, nargs="+", default=[0.6], help="minilm: params budgets")
    parser.add_argument("--dense", type=Path, default=None, help="smollm2: a dense bundle (qsvd-export export)")
    parser.add_argument("--torch-plan", type=Path, default=None, help="smollm2: reuse this torch-stage plan")
    parser.add_argument("--budget", default="kv=0.5", help="smollm2 budget")
    parser.add_argument("--windows", type=int, default=32, help="smollm2: wiki_eval windows of 512")
    args = parser.parse_args(argv)
    rows = minilm(args) if args.only == "minilm" else smollm2(args)
    out = args.out or args.work / f"{args.only}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1) + "\n")
    for row in rows:
        score = row.get("cosine", row.get("wiki_eval_ppl"))
        print(f"{row.get('calibration', row['budget']):<36} {row['method']:<46} R1 {row['r1']:.3f}  {score}")


if __name__ == "__main__":
    main()
