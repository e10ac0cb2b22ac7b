"""smollm2 bundles in the runtimes receivers already use, each in a fresh venv built from PyPI at pinned versions:
onnxruntime-genai alone (no torch, transformers or qsvd-export) and optimum-onnx with transformers 4.x.

Slow (``pytest -m slow``): two venvs and three real bundles (dense fp32, the cpu default, a kv=0.5 int8
latent); qsvd-export itself is then installed into the optimum venv and compiles a graph there. Nothing is
cached outside the test's tmp dir (pip runs with --no-cache-dir)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsvd_export import CompressionOptions, ExportOptions, compress_model, export_model, load_bundle
from qsvd_export.bundle import load_bundle_config
from qsvd_export.genai_config import GENAI_VERSION
from qsvd_export.runtime_files import portable_tokenizer_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me three facts about Paris, one per line."
NEW_TOKENS = 32
OPTIMUM_PINS = ["optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "torch==2.13.0",
                "onnxruntime==1.32.0"]
PIP_OFFLINE = ("Could not find a version", "No matching distribution", "Max retries", "NewConnectionError",
               "Temporary failure in name resolution", "Network is unreachable", "timed out")


def fresh_venv(folder: Path, pins: list[str]) -> str:
    """A venv in ``folder`` with only ``pins`` (and their dependencies) from PyPI; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = str(folder / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", *pins], check=False,
                         capture_output=True, text=True, timeout=1800)
    if pip.returncode != 0:
        if any(marker in pip.stdout + pip.stderr for marker in PIP_OFFLINE):
            pytest.skip(f"pip cannot reach the package index: {(pip.stderr.strip().splitlines() or [''])[-1]}")
        pytest.fail(f"pip install {' '.join(pins)} failed:\n{pip.stderr[-3000:]}")
    return python


def reference(bundle: Path) -> tuple[list[int], list[int], float]:
    """Prompt ids (chat template), the project's greedy new ids and its decode tokens/s (after the first token)."""
    runner = load_bundle(bundle)
    ids = runner.encode(PROMPT)
    new, first = [], 0.0
    for token in runner.stream_ids(ids, NEW_TOKENS):
        new.append(token)
        first = first or time.perf_counter()
    rate = (len(new) - 1) / (time.perf_counter() - first) if len(new) > 1 else 0.0
    return ids, new, rate


@pytest.fixture(scope="module")
def smollm2_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtimes")
    latent = compress_model("smollm2-135m", root / "kv50", CompressionOptions(
        budget="kv=0.5", calib_windows=32, grad_windows=8, target="cpu"))  # the int8 latent: genai's key/value view
    return {"dense fp32": export_model("smollm2-135m", root / "dense").out,
            "cpu default (w4a8)": export_model("smollm2-135m", root / "cpu", ExportOptions(target="cpu")).out,
            "latent kv=0.5 (cpu, int8 latent)": latent.out}


def test_genai_alone_generates_the_runners_tokens(smollm2_bundles, tmp_path):
    python = fresh_venv(tmp_path / "venv", [f"onnxruntime-genai=={GENAI_VERSION}"])
    for module in ("torch", "transformers", "qsvd_export"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, cwd=tmp_path)
        assert probe.returncode != 0, f"{module} is importable in the genai-only venv"
    rates = {}
    for name, bundle in smollm2_bundles.items():
        report = json.loads((bundle / "report.json").read_text())
        assert report["runtimes"]["onnxruntime_genai"]["runs"] is True, name
        ids, new, ours = reference(bundle)
        run = subprocess.run([python, str(ROOT / "samples" / "genai_chat.py"), str(bundle), "--prompt", PROMPT,
                              "--max-new-tokens", str(NEW_TOKENS), "--print-ids"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        genai = json.loads(run.stdout.strip().splitlines()[-1])
        assert genai["prompt_ids"] == ids, f"{name}: genai's chat template gives other ids"
        assert genai["new_ids"] == new, name
        eos = load_bundle_config(bundle).generation.get("eos_token_ids") or []
        assert len(new) == NEW_TOKENS or new[-1] in eos, f"{name}: stopped early ({len(new)} tokens) without EOS"
        rates[name] = (genai["decode_tokens_per_s"], round(ours, 2))
    print("\ndecode tok/s (onnxruntime-genai, project's DecoderRunner): "
          + "; ".join(f"{name}: {g} vs {o}" for name, (g, o) in rates.items()))


OPTIMUM_SCRIPT = """
import json, sys
import torch, transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
bundle, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(bundle)
ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
model = ORTModelForCausalLM.from_pretrained(bundle)
out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     max_new_tokens=new_tokens, do_sample=False)
print(json.dumps({"transformers": transformers.__version__, "prompt_ids": ids, "new_ids": out[0, len(ids):].tolist()}))
"""


@pytest.fixture(scope="module")
def optimum_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh venv with optimum-onnx 0.1.0 and the transformers 4.x it pins (no qsvd-export yet)."""
    return fresh_venv(tmp_path_factory.mktemp("optimum") / "venv", OPTIMUM_PINS)


def test_optimum_with_transformers_4_generates_the_runners_tokens(smollm2_bundles, optimum_python, tmp_path):
    python = optimum_python
    bundle = smollm2_bundles["dense fp32"]
    assert json.loads((bundle / "report.json").read_text())["runtimes"]["optimum"]["runs"] is True
    ids, new, _ = reference(bundle)
    run = subprocess.run([python, "-c", OPTIMUM_SCRIPT, str(bundle), PROMPT, str(NEW_TOKENS)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"].startswith("4.")
    assert result["prompt_ids"] == ids  # the bundle's tokenizer_config.json loads in 4.x with the same template
    assert result["new_ids"] == new


def test_the_package_installs_and_compiles_graphs_beside_optimum(optimum_python, tmp_path):
    """`pip install .` into optimum-onnx's venv resolves without moving its pins; there the front door compiles
    optimum's graph (dense and graph-only QSVD, cpu), and the torch stage says in one line that it needs 5.x."""
    python = optimum_python
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", str(ROOT), *OPTIMUM_PINS],
                         capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-2000:]
    versions = subprocess.run([python, "-c", "import transformers, optimum.onnxruntime, qsvd_export; "
                               "print(transformers.__version__)"], capture_output=True, text=True, cwd=tmp_path)
    assert versions.returncode == 0 and versions.stdout.startswith("4."), versions.stderr[-2000:]
    source = tmp_path / "optimum_llama"
    shutil.copytree(ROOT / "tests" / "fixtures" / "optimum_llama", source)
    portable_tokenizer_config(source)  # the fixture's tiny tokenizer was written by 5.x; optimum's own are 4.x's
    for name, extra in (("dense", []), ("kv50", ["--budget", "kv=0.5", "--calib-windows", "4", "--grad-windows", "2"])):
        out = tmp_path / name
        run = subprocess.run([python, "-m", "qsvd_export", str(source / "model.onnx"), "--target", "cpu", *extra,
                              "-o", str(out), "-q"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        generate = subprocess.run([python, "-m", "qsvd_export", "run", str(out), "--prompt", "hello",
                                   "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert generate.returncode == 0, generate.stderr[-3000:]
    refused = subprocess.run([python, "-m", "qsvd_export", "export", "tiny-llama", "-o", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    error = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "needs transformers >= 5.24" in error and not (tmp_path / "x").exists()
