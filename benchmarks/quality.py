"""Quality of the torch stage: perplexity vs (R1, R2) for QSVD and the baselines, in one run.

    python -m benchmarks.quality [--quick] [--split report|dev] [--out results/quality.json]

Rows (smollm2-135m): dense; QSVD (gradient importance, per-layer grouping); uniform joint QKV; uniform
joint KV (Q dense); per-matrix SVD (K and V separately, Q dense); Fisher-per-layer (joint KV).
All share one calibration (wiki_calib) and one whitening. Perplexity follows EVAL.md (torch, plan
applied). minilm-l6: mean embedding cosine vs dense over news_eval sentences at several R1.

``--split dev`` scores on the dev split instead (decoders: the last 512-token windows of wiki_calib,
``data.dev_windows``; minilm: ``data.dev_sentences``), the data defaults are chosen on; the report split
(wiki_eval, news_eval) is what the README quotes. ``--methods`` keeps some of the rows (their labels'
keys below), ``--minilm-calibrations`` compares encoder calibrations (sentence-length windows with
Cholesky input whitening, the default, against 128-token windows and abs-mean input whitening).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import resource
import time
from pathlib import Path

import torch

from qsvd_export.compress.budget import parse_budget
from qsvd_export.compress.allocate import LayerScores
from qsvd_export.compress.compressor import analyze, build_plan, kfac_importance
from qsvd_export.compress.options import CompressOptions
from qsvd_export.data import dev_sentences, dev_windows, read_text, token_windows
from qsvd_export.evaluate import torch_window_nlls
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.runtimes.metrics import perplexity
from qsvd_export.zoo import load_model

METHODS = [  # (allocation, grouping, label); --methods picks rows by allocation:grouping
    ("qsvd", "auto", "QSVD (gradient, best grouping)"),
    ("qsvd-kfac", "auto", "QSVD (K-FAC importance, best grouping)"),
    ("qsvd", "qkv", "QSVD (gradient, joint QKV)"),
    ("uniform", "qkv", "uniform joint QKV"),
    ("uniform", "kv", "uniform joint KV (Q dense)"),
    ("uniform", "separate", "per-matrix SVD (K, V)"),
    ("fisher", "kv", "Fisher-per-layer joint KV"),
]
BUDGETS = ["kv=0.5,params=1.0", "params=0.8,kv=0.75", "kv=0.75,params=1.0", "kv=0.3,params=1.0"]
METHOD_KEYS = [f"{allocation}:{grouping}" for allocation, grouping, _ in METHODS]
MINILM_METHODS = [("qsvd", "auto", "QSVD (gradient, best grouping)"), ("uniform", "qkv", "uniform joint QKV"),
                  ("uniform", "separate", "per-matrix SVD (K, V; Q dense)"),
                  ("fisher", "qkv", "Fisher-per-layer joint QKV")]
MINILM_METHOD_KEYS = [f"{allocation}:{grouping}" for allocation, grouping, _ in MINILM_METHODS]
# encoder calibrations compared by --minilm-calibrations: name -> (CompressOptions overrides)
MINILM_CALIBRATIONS = {
    "default": {},  # 256 x 32-token windows, Cholesky input whitening (CALIBRATION_DEFAULTS, encoder)
    "windows-128": {"calib_windows": 128, "calib_length": 128},  # 128 x 128-token windows (docs/results.md)
    "absmean-input": {"fisher_input": "absmean"},
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def smollm2_table(args: argparse.Namespace) -> dict:
    loaded = load_model("smollm2-135m")
    torch.set_num_threads(args.threads)
    if args.split == "dev":
        eval_sets = {"dev": dev_windows(loaded.tokenizer, args.eval_windows)}
    else:
        eval_sets = {name: token_windows(loaded.tokenizer, read_text(name), 512, args.eval_windows, source=name)
                     for name in ("wiki_eval", "news_eval")}

    def evaluate(model) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {name: perplexity(torch_window_nlls(model, rows)) for name, rows in eval_sets.items()}

    rows = [{"method": "dense", "budget": "-", "r1": 1.0, "r2": 1.0, **evaluate(loaded.model)}]
    print(json.dumps(rows[-1]), flush=True)
    results = {"rows": rows, "timing": {}}
    for whitening in args.whitenings:
        options = CompressOptions(budget=parse_budget("kv=1.0"), whitening=whitening, calib_windows=args.calib_windows,
                                  grad_windows=args.grad_windows)
        start = time.perf_counter()
        analysis = analyze(loaded, options, groups=("qkv", "kv", "q", "k", "v"), keep_kfac_statistics=True)
        results["timing"][f"analysis_{whitening}_s"] = round(time.perf_counter() - start, 1)
        results["timing"]["peak_rss_gb"] = round(peak_rss_gb(), 2)
        kfac_analysis = analysis
        if analysis.output_fisher is not None:
            groups = tuple(analysis.svds[0])
            importance, fisher = kfac_importance(analysis.dims, analysis.stats, analysis.svds, analysis.output_fisher, groups)
            kfac_analysis = dataclasses.replace(analysis, importance_kind="kfac", scores=[
                LayerScores(d, {g: importance[li][g].numpy() for g in groups}, fisher[li])
                for li, d in enumerate(analysis.dims)])
        for budget in args.budgets:
            for allocation, grouping, label in METHODS:
                if f"{allocation}:{grouping}" not in args.methods:
                    continue
                scored = analysis
                if allocation == "qsvd-kfac":
                    if analysis.output_fisher is None:
                        continue
                    allocation, scored = "qsvd", kfac_analysis
                opts = CompressOptions(budget=parse_budget(budget), allocation=allocation, grouping=grouping,
                                       whitening=whitening)
                try:
                    plan = build_plan(loaded.name, str(loaded.model.config.model_type), scored, opts)
                except Exception as exc:  # noqa: BLE001 - a budget a baseline cannot meet is a row, not a crash
                    rows.append({"method": label, "whitening": whitening, "budget": budget, "error": str(exc)})
                    continue
                model = apply_plan(copy.deepcopy(loaded.model), plan)
                row = {"method": label, "whitening": whitening, "budget": budget, "r1": plan.r1, "r2": plan.r2,
                       "groupings": sorted({la.grouping for la in plan.layers}),
                       "ranks": [la.latent_rank for la in plan.layers], **evaluate(model)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
                del model
    return results


def minilm_table(args: argparse.Namespace) -> list[dict]:
    """minilm-l6: mean embedding cosine vs dense over 256 sentences (news_eval, EVAL.md; ``--split dev``:
    the dev sentences) at several R1, for each of ``args.minilm_calibrations``."""
    from qsvd_export.evaluate import embedding_cosine, eval_sentences, sentence_embeddings

    loaded = load_model("minilm-l6")
    sentences = dev_sentences(256) if args.split == "dev" else eval_sentences(read_text("news_eval"), count=256)
    dense = sentence_embeddings(loaded.model, loaded.tokenizer, sentences)
    rows = []
    for calibration in args.minilm_calibrations:
        overrides = MINILM_CALIBRATIONS[calibration]
        options = CompressOptions(budget=parse_budget("params=1.0"), **overrides)  # encoder calibration defaults
        analysis = analyze(loaded, options, groups=("qkv", "kv", "q", "k", "v"), keep_kfac_statistics=True)
        for r1 in args.minilm_r1:
            for allocation, grouping, label in MINILM_METHODS:
                if f"{allocation}:{grouping}" not in args.minilm_methods:
                    continue
                opts = CompressOptions(budget=parse_budget(f"params={r1}"), allocation=allocation, grouping=grouping,
                                       **overrides)
                plan = build_plan(loaded.name, str(loaded.model.config.model_type), analysis, opts)
                model = apply_plan(copy.deepcopy(loaded.model), plan)
                cosine = embedding_cosine(dense, sentence_embeddings(model, loaded.tokenizer, sentences))
                rows.append({"model": "minilm-l6", "calibration": calibration, "method": label, "r1": plan.r1,
                             "split": args.split, "sentences": len(sentences), "cosine": cosine})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 eval windows, 32 calibration, 8 gradient windows")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--grad-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--whitenings", nargs="+", default=["fisher"])
    parser.add_argument("--budgets", nargs="+", default=BUDGETS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minilm-r1", nargs="+", type=float, default=[0.6, 0.8])
    parser.add_argument("--only", choices=["smollm2", "minilm"], default=None)
    parser.add_argument("--split", choices=["report", "dev"], default="report",
                        help="report: wiki_eval + news_eval (news_eval sentences for minilm); dev: the dev split")
    parser.add_argument("--methods", nargs="+", choices=METHOD_KEYS, default=METHOD_KEYS,
                        help="rows to run, as allocation:grouping (default all)")
    parser.add_argument("--minilm-methods", nargs="+", choices=MINILM_METHOD_KEYS, default=MINILM_METHOD_KEYS)
    parser.add_argument("--minilm-calibrations", nargs="+", choices=list(MINILM_CALIBRATIONS), default=["default"])
    parser.add_argument("--out", type=Path, default=Path("results/quality.json"))
    args = parser.parse_args()
    if args.quick:
        args.calib_windows, args.grad_windows, args.eval_windows = 32, 8, 8
    start = time.perf_counter()
    results = smollm2_table(args) if args.only != "minilm" else {"rows": [], "timing": {}}
    if args.only != "smollm2":
        results["minilm"] = minilm_table(args)
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if results["rows"]:
        print_table(results["rows"])
    if results.get("minilm"):
        print(f"{'minilm-l6 method':<34} {'calibration':<14} {'R1':>6} {'cosine':>8}")
        for r in results["minilm"]:
            print(f"{r['method']:<34} {r['calibration']:<14} {r['r1']:>6.3f} {r['cosine']:>8.4f}")


def print_table(rows: list[dict]) -> None:
    sets = [name for name in ("wiki_eval", "news_eval", "dev") if name in rows[0]]
    print(f"{'method':<34} {'whitening':<10} {'budget':<20} {'R1':>6} {'R2':>6} " + " ".join(f"{s:>9}" for s in sets))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<34} {r.get('whitening', '-'):<10} {r['budget']:<20} {'-':>6} {'-':>6} {r['error'][:40]}")
            continue
        print(f"{r['method']:<34} {r.get('whitening', '-'):<10} {r['budget']:<20} {r['r1']:>6.3f} {r['r2']:>6.3f} "
              + " ".join(f"{r[s]:>9.3f}" for s in sets))


if __name__ == "__main__":
    main()
