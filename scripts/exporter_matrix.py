"""Exporter × model family × (graph-only plan, cpu, npu): what ``qsvd-export model.onnx`` does with graphs
written by the exporters people use. Writes ``results/exporter_matrix.json`` and ``docs/exporters.md``.

    python scripts/exporter_matrix.py [--optimum-python VENV/bin/python] [--work DIR]
    python scripts/exporter_matrix.py --render-only     # docs/exporters.md from the committed JSON

Each family is the project's tiny random model (``qsvd_export/tiny.py``; structure and parity, never
quality), with the model's default **sdpa** attention, written by each exporter into a folder of its own:

- ``torchscript``: ``torch.onnx.export(dynamo=False, opset_version=17)``; decoders with optimum-style flat
  KV-cache I/O (input_ids, attention_mask, position_ids, past_key_values.* → logits, present.*);
- ``dynamo``: ``torch.onnx.export(dynamo=True)`` at its default opset, no cache;
- ``dynamo23``: the same at opset 23 (sdpa as the ONNX ``Attention`` op);
- ``optimum``: optimum-onnx ``main_export`` (a separate venv with transformers 4.x; ``--optimum-python``):
  text-generation-with-past / feature-extraction / image-feature-extraction, its folder as written
  (config.json beside the graph) plus the tiny tokenizer;
- ``genai`` / ``genai-int4``: onnxruntime-genai's model builder (``-p fp32|int4 -e cpu``), its folder as written.

Cells (every one a real ``qsvd-export`` run in this process, its exit code and one-line error recorded):

- **plan**: ``--budget kv=0.5`` (decoders with a cache) or ``params=0.8`` (others), ``--grad-windows 2``,
  calibrated on 4 × 16 random token windows (``--calib-npz``) or 4 noise images (``--calib-images``); "works"
  also requires the bundle to equal torch with the same plan (the tiny model with ``apply_plan``): max |Δ| of
  the first output (prefill + one cached step for cache graphs) ≤ 1e-4;
- **cpu**: ``--target cpu`` on the dense graph;
- **npu**: ``--target npu --context-length 48 --prefill-length 8``: static QDQ graphs compiled on QNN HTP
  with CPU fallback disabled (onnxruntime-qnn's HTP backend on this machine) and checked against the CPU EP.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exporter_table import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
# the code measured is the checkout when the script started (plus uncommitted changes if `git status` shows any)
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results" / "exporter_matrix.json"
DOC = ROOT / "docs" / "exporters.md"
FAMILIES = ["llama", "qwen2", "bert", "vit"]
DECODERS = ("llama", "qwen2")
EXPORTERS = {
    "torchscript": "TorchScript (`torch.onnx.export(dynamo=False)`, opset 17, sdpa; decoders with a flat KV cache)",
    "dynamo": "torch dynamo exporter (default opset, sdpa, no cache)",
    "dynamo23": "torch dynamo exporter, opset 23 (sdpa as the ONNX `Attention` op, no cache)",
    "optimum": "optimum-onnx `main_export` (TorchScript; decoders text-generation-with-past)",
    "genai": "onnxruntime-genai model builder, `-p fp32 -e cpu` (fused `GroupQueryAttention`)",
    "genai-int4": "onnxruntime-genai model builder, `-p int4 -e cpu` (MatMulNBits weights)",
}
OPTIMUM_TASKS = {"llama": "text-generation-with-past", "qwen2": "text-generation-with-past", "bert": "feature-extraction",
                 "vit": "image-feature-extraction"}
PARITY = 1e-4


# --- graphs -----------------------------------------------------------------------------------------------
def _sdpa(family: str) -> Any:
    from qsvd_export.tiny import build_tiny

    model = build_tiny(family).model
    model.set_attn_implementation("sdpa")
    return model


class _Outputs:
    """Text: (input_ids, attention_mask) → first output; vision: pixel_values → first output."""

    def __new__(cls, model: Any, vision: bool) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: Any) -> Any:
                if vision:
                    return self.model(pixel_values=inputs[0])[0]
                return self.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False)[0]

        return Wrapper()


class _WithCache:
    def __new__(cls, model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                for i in range(len(past) // 2):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True)
                return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

        return Wrapper()


def torch_graph(family: str, exporter: str, folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    model = _sdpa(family)
    vision = family == "vit"
    if exporter == "torchscript" and family in DECODERS:
        config = model.config
        layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        past = [torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
        example = (torch.randint(0, 256, (1, 4)), torch.ones(1, 7, dtype=torch.long), torch.arange(3, 7)[None], *past)
        names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(layers)
                                                                    for kv in ("key", "value")]
        outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"},
                "logits": {0: "b", 1: "s"}, **{n: {0: "b", 2: "p"} for n in names[3:]},
                **{n: {0: "b", 2: "t"} for n in outputs[1:]}}
        torch.onnx.export(_WithCache(model), example, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=outputs, dynamic_axes=axes)
        return
    wrapper = _Outputs(model, vision)
    if vision:
        example, names = (torch.randn(1, 3, 32, 32),), ["pixel_values"]
    else:
        example = (torch.randint(0, 256, (1, 8)), torch.ones(1, 8, dtype=torch.long))
        names = ["input_ids", "attention_mask"]
    output = ["logits" if family in DECODERS else "out"]
    if exporter == "torchscript":
        axes = {n: ({0: "b"} if vision else {0: "b", 1: "s"}) for n in names}
        torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=output, dynamic_axes=axes)
    else:
        batch, seq = torch.export.Dim("b"), torch.export.Dim("s", min=2)
        shapes = (({0: batch},) if vision else ({0: batch, 1: seq}, {0: batch, 1: seq}),)
        opset = {"opset_version": 23} if exporter == "dynamo23" else {}
        torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=names, output_names=output,
                          dynamic_shapes=shapes, external_data=False, **opset)


def hf_folder(family: str, root: Path) -> Path:
    """The tiny model saved as an HF folder (safetensors, config, byte-level tokenizer for text families)."""
    from qsvd_export.tiny import _vlm_tokenizer, build_tiny

    folder = root / "hf" / family
    if not (folder / "config.json").exists():
        build_tiny(family).model.save_pretrained(folder)
        if family != "vit":
            _vlm_tokenizer().save_pretrained(folder)
    return folder


def external_graph(family: str, exporter: str, folder: Path, root: Path, optimum_python: str | None) -> str | None:
    """Run an outside exporter into ``folder``; None on success, else why there is no graph."""
    hf = hf_folder(family, root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if exporter == "optimum":
        if not optimum_python:
            return "not run: no optimum-onnx venv given (--optimum-python)"
        code = ("import sys; from optimum.exporters.onnx import main_export; "
                "main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], device='cpu')")
        run = subprocess.run([optimum_python, "-c", code, str(hf), str(folder), OPTIMUM_TASKS[family]], env=env,
                             capture_output=True, text=True, timeout=900)
        if run.returncode == 0 and family != "vit":
            for name in ("tokenizer.json", "tokenizer_config.json"):  # transformers 4 cannot read the tiny one
                if not (folder / name).exists():
                    shutil.copy2(hf / name, folder / name)
    else:
        precision = "int4" if exporter == "genai-int4" else "fp32"
        run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder),
                              "-p", precision, "-e", "cpu"], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0 or not (folder / "model.onnx").exists():
        lines = [line for line in (run.stderr + run.stdout).strip().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        return f"the exporter fails: {reason.strip()[:200]}"
    return None


# --- cells ------------------------------------------------------------------------------------------------
def qsvd(args: list[str]) -> tuple[int, str, float]:
    """``qsvd-export ARGS`` in this process: (exit code, its one-line error or '', seconds)."""
    from qsvd_export.cli import main

    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*args, "-q"])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("qsvd-export:")]
    error = lines[-1].removeprefix("qsvd-export: ").removeprefix("error: ") if lines else ""
    return code, error, round(time.perf_counter() - start, 1)


def _images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _has_cache(graph: Path) -> bool:
    import onnx

    return any(i.name.startswith("past_key_values") for i in onnx.load(str(graph), load_external_data=False).graph.input)


def parity(family: str, bundle: Path, cached: bool) -> float:
    """Max |Δ| between the bundle and the tiny torch model with the bundle's plan applied."""
    import onnxruntime as ort
    import torch

    from qsvd_export.compress.apply_plan import apply_plan
    from qsvd_export.plan.io import load_plan
    from qsvd_export.tiny import build_tiny

    model = apply_plan(build_tiny(family).model, load_plan(bundle))
    rng = np.random.default_rng(3)
    if cached:
        from qsvd_export.runtimes.decode import DecoderRunner

        ids = rng.integers(0, 256, (1, 9))
        runner = DecoderRunner(bundle)
        logits, cache = runner.prefill(ids)
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(ids), use_cache=True)
        worst = float(np.abs(expected.logits.numpy() - logits).max())
        step, _ = runner.step(np.asarray([[7]]), np.ones((1, 10)), np.asarray([[9]]), cache)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([[7]]), past_key_values=expected.past_key_values, use_cache=True)
        return max(worst, float(np.abs(expected.logits.numpy() - step).max()))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feed: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        if value.name == "pixel_values":
            feed[value.name] = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        elif value.name == "input_ids":
            feed[value.name] = rng.integers(0, 256, (1, 11))
        elif value.name in ("attention_mask", "token_type_ids"):
            feed[value.name] = (np.ones if value.name == "attention_mask" else np.zeros)((1, 11), dtype=np.int64)
        elif value.name == "position_ids":
            feed[value.name] = np.arange(11)[None]
    got = session.run(None, feed)[0]
    kwargs = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        expected = model(**kwargs, **({"use_cache": False} if family in DECODERS else {}))[0]
    return float(np.abs(expected.numpy() - got).max())


def cells(family: str, graph: Path, work: Path, tokenizer: Path) -> dict[str, Any]:
    cached = _has_cache(graph)
    budget = "kv=0.5" if cached else "params=0.8"
    calib = ["--calib-images", str(_images(work / "images"))] if family == "vit" else \
        ["--calib-npz", str(work / "calib.npz")]
    if family != "vit":
        np.savez(work / "calib.npz", input_ids=np.random.default_rng(1).integers(0, 256, (4, 16)))
    result: dict[str, Any] = {"graph_has_kv_cache": cached}
    plan_out = work / "plan"
    code, error, seconds = qsvd([str(graph), "--budget", budget, "--grad-windows", "2", *calib, "-o", str(plan_out),
                                 "--overwrite"])
    cell: dict[str, Any] = {"command": f"--budget {budget} --grad-windows 2 {calib[0]} ...", "exit": code,
                            "seconds": seconds}
    if code == 0:
        report = json.loads((plan_out / "report.json").read_text())
        plan = json.loads((plan_out / "plan.json").read_text())
        cell.update(attention_blocks=report["graph_stage"]["attention_blocks"],
                    latent_layers=sum(1 for la in report["graph_stage"]["layers"] if la["cache"] == "latent"),
                    unfused=report.get("unfused_attention"), gradients=plan["calibration"].get("gradients"))
        try:
            cell["max_abs_diff_vs_torch"] = parity(family, plan_out, cached)
        except Exception as exc:  # noqa: BLE001 - recorded, the cell then does not count as working
            cell["parity_error"] = f"{exc.__class__.__name__}: {str(exc)[:160]}"
        ok = cell.get("max_abs_diff_vs_torch", np.inf) <= PARITY and cell["attention_blocks"] > 0
        cell["status"] = "works" if ok else "fails"
    else:
        cell.update(status="refused", why=error)
    result["plan"] = cell
    code, error, seconds = qsvd([str(graph), "--target", "cpu", "-o", str(work / "cpu"), "--overwrite"])
    result["cpu"] = {"command": "--target cpu", "exit": code, "seconds": seconds,
                     **({"status": "works", "quantized_matmuls": json.loads((work / "cpu" / "report.json").read_text())
                         ["target"]["quantized_matmuls"]} if code == 0 else {"status": "refused", "why": error})}
    # a bare text graph has no tokenizer beside it: npu calibration text comes through --tokenizer (the HF folder)
    bare = family != "vit" and not any((graph.parent / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
    extra = ["--tokenizer", str(tokenizer)] if bare else []
    code, error, seconds = qsvd([str(graph), "--target", "npu", "--context-length", "48", "--prefill-length", "8",
                                 *extra, "-o", str(work / "npu"), "--overwrite"])
    npu: dict[str, Any] = {"command": "--target npu --context-length 48 --prefill-length 8"
                           + (" --tokenizer HF_DIR" if extra else ""), "exit": code, "seconds": seconds}
    if code == 0:
        check = json.loads((work / "npu" / "report.json").read_text())["target"].get("verification") or {}
        npu.update(qnn=check.get("qnn"), argmax_agreement=check.get("argmax_agreement"),
                   tokens_match=check.get("tokens_match"))
        npu["status"] = "works" if check.get("qnn") == "compiled" else "built, not compiled"
    else:
        npu.update(status="refused", why=error)
    result["npu"] = npu
    return result


# --- table ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qsvd-exporter-matrix"))
    parser.add_argument("--optimum-python", default=None, help="a python with optimum-onnx and transformers 4.x")
    parser.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=list(EXPORTERS))
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    if args.render_only:
        DOC.write_text(render(json.loads(RESULTS.read_text())))
        print(f"wrote {DOC}")
        return
    import warnings

    warnings.filterwarnings("ignore")
    matrix: dict[str, dict[str, Any]] = {}
    for exporter in args.exporters:
        matrix[exporter] = {}
        for family in args.families:
            work = args.work / exporter / family
            shutil.rmtree(work, ignore_errors=True)
            folder = work / "graph"
            if exporter == "genai-int4" and family != "llama":
                continue
            try:
                why = external_graph(family, exporter, folder, args.work, args.optimum_python) \
                    if exporter in ("optimum", "genai", "genai-int4") else torch_graph(family, exporter, folder)
            except Exception as exc:  # noqa: BLE001 - the exporter itself failed: recorded
                why = f"the exporter fails: {exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"
            if why:
                matrix[exporter][family] = {"no_graph": why}
            else:
                matrix[exporter][family] = cells(family, folder / "model.onnx", work, hf_folder(family, args.work))
            print(exporter, family, json.dumps(matrix[exporter][family])[:600], flush=True)
    import onnxruntime
    import torch

    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, no GPU", "commit": COMMIT,
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "exporters": EXPORTERS, "matrix": matrix,
            "reproduce": "python scripts/exporter_matrix.py --optimum-python VENV/bin/python"}
    if RESULTS.exists() and (set(args.exporters) != set(EXPORTERS) or set(args.families) != set(FAMILIES)):
        old = json.loads(RESULTS.read_text())  # a partial run updates those cells of the committed table
        for exporter, families in matrix.items():
            old["matrix"].setdefault(exporter, {}).update(families)
        data["matrix"] = {e: old["matrix"][e] for e in EXPORTERS if e in old["matrix"]}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    DOC.write_text(render(data))
    print(f"wrote {RESULTS} and {DOC}")


if __name__ == "__main__":
    main()
