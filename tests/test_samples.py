"""samples/run_bundle.py: the standalone reference runner gives the in-package runtimes' tokens and logits.

The sample runs in a subprocess where importing torch, transformers, qsvd_export or jinja2 fails, so
it provably needs only onnxruntime + tokenizers + numpy (the slow test runs it in a fresh virtualenv).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from qsvd_export.cli import main
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.runtimes.static_decode import StaticDecoder

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "run_bundle.py"
CALIB = ["--calib-windows", "4", "--calib-length", "64", "--grad-windows", "2", "-q"]
NPU = ["--target", "npu", "--context-length", "48", "--prefill-length", "8", "--no-verify", "-q"]
CONTEXT = 48

# Runs SAMPLE with the remaining argv; importing any blocked package raises ImportError.
GUARD = """
import runpy, sys
BLOCKED = {"torch", "transformers", "qsvd_export", "jinja2"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the sample must not import it")
        return None
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    leaked = sorted(BLOCKED & {name.split(".")[0] for name in sys.modules})
    if leaked:
        print(f"imported {leaked}", file=sys.stderr)
        sys.exit(99)
"""


def run_sample(*args: str, python: str = sys.executable, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([python, "-I", "-c", GUARD, str(SAMPLE), *args], check=False, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def sample_ids(result: subprocess.CompletedProcess) -> tuple[list[int], list[int]]:
    assert result.returncode == 0, result.stderr
    lines = {key: line[len(key):] for line in result.stdout.split("\n") for key in ("prompt_ids: ", "new_ids: ")
             if line.startswith(key)}
    return [int(i) for i in lines["prompt_ids: "].split(",")], [int(i) for i in lines["new_ids: "].split(",")]


def sample_new_ids(bundle: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    """The sample's new token ids for prompt ``ids`` (``--ids``: no tokenizer involved)."""
    result = run_sample(str(bundle), "--ids", ",".join(map(str, ids)), "--max-new-tokens", str(max_new_tokens),
                        "--print-ids")
    prompt, new = sample_ids(result)
    assert prompt == ids
    return new


def load_sample() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_bundle_sample", SAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bundles, tmp_path_factory) -> dict[str, Path]:
    """Dense and latent tiny-llama bundles, dynamic and static (npu, T=48, S=8)."""
    root = tmp_path_factory.mktemp("samples")
    out = {"dense": bundles.dense("llama"), "latent": root / "latent"}
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out["latent"]), *CALIB]) == 0
    for kind in ("dense", "latent"):
        out[f"{kind}-npu"] = root / f"{kind}-npu"
        assert main([str(out[kind] / "model.onnx"), *NPU, "-o", str(out[f"{kind}-npu"])]) == 0
    kinds = {name: {layer["kind"] for layer in json.loads((path / "qsvd_config.json").read_text())["cache"]}
             for name, path in out.items()}
    assert kinds == {"dense": {"dense"}, "latent": {"latent"}, "dense-npu": {"dense"}, "latent-npu": {"latent"}}
    return out


def _eos(bundle: Path) -> list[int]:
    return json.loads((bundle / "qsvd_config.json").read_text())["generation"]["eos_token_ids"]


@pytest.mark.parametrize("kind", ["dense", "latent"])
def test_dynamic_bundle_tokens_match_decoder_runner(kind, tiny):
    bundle = tiny[kind]
    prompt, new = sample_ids(run_sample(str(bundle), "--prompt", "Hello, wörld", "--max-new-tokens", "12",
                                        "--print-ids"))
    assert prompt == list("Hello, wörld".encode())  # tiny bundles: UTF-8 bytes
    assert new == DecoderRunner(bundle).generate(prompt, 12, _eos(bundle))
    ids = [200, 13, 77, 5, 190, 33]
    assert sample_new_ids(bundle, ids, 5) == DecoderRunner(bundle).generate(ids, 5, _eos(bundle))


@pytest.mark.parametrize("kind", ["dense-npu", "latent-npu"])
def test_static_bundle_tokens_match_static_decoder_up_to_the_full_window(kind, tiny):
    """13 tokens = a left-padded chunk + a full one; then decode until the 48-slot window is full."""
    bundle = tiny[kind]
    result = run_sample(str(bundle), "--prompt", "thirteen char", "--max-new-tokens", "100", "--print-ids")
    prompt, new = sample_ids(result)
    reference = StaticDecoder.from_bundle(bundle).generate(prompt, CONTEXT - len(prompt) + 1, _eos(bundle))
    assert new == reference
    if 2 not in new:  # tiny-llama's EOS id
        assert len(new) == CONTEXT - len(prompt) + 1 and "context holds 48 tokens" in result.stderr
    eight = [9, 8, 7, 6, 5, 4, 3, 1]  # exactly one prefill chunk, no padding
    assert sample_new_ids(bundle, eight, 4) == StaticDecoder.from_bundle(bundle).generate(eight, 4, _eos(bundle))


def test_generation_stops_after_an_eos_token(tiny):
    """Tiny random models repeat the last token: a prompt ending in EOS (2) yields just [2]."""
    for kind in ("dense", "dense-npu"):
        assert sample_new_ids(tiny[kind], [5, 6, 2], 9) == [2]


def test_sample_loops_reproduce_the_runtime_logits_step_by_step(tiny):
    """Teacher-forced: the sample's loops give the same logits as DecoderRunner / StaticDecoder every step
    (tiny random models decode repetitively, so token equality alone would prove little)."""
    sample = load_sample()
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, 256, 21)]  # static: 3 chunks, the first with 3 pads
    forced = [int(t) for t in rng.integers(0, 256, CONTEXT - len(prompt))]
    for kind in ("dense", "latent"):
        loop = sample.DynamicLoop(sample.load_bundle(tiny[kind]))
        runner = DecoderRunner(tiny[kind])
        reference, cache = runner.prefill(np.asarray([prompt]))
        assert np.array_equal(loop.start(prompt), reference[0, -1])
        length = len(prompt)
        for token in forced[:10]:
            reference, cache = runner.step(np.asarray([[token]]), np.ones((1, length + 1)), np.asarray([[length]]),
                                           cache)
            assert np.array_equal(loop.push(token), reference[0, -1]), (kind, length)
            length += 1
        assert sample.load_bundle(tiny[kind]).prefill_chunk == runner.prefill_chunk == 512  # unfused: recorded
        chunked = sample.DynamicLoop(sample.load_bundle(tiny[kind]), prefill_chunk=5)  # 5 + 5 + 5 + 5 + 1 tokens
        reference, _ = DecoderRunner(tiny[kind], prefill_chunk=5).prefill(np.asarray([prompt]))
        assert np.array_equal(chunked.start(prompt), reference[0, -1]) and chunked.length == len(prompt)
    for kind in ("dense-npu", "latent-npu"):
        loop = sample.StaticLoop(sample.load_bundle(tiny[kind]))
        decoder = StaticDecoder.from_bundle(tiny[kind])
        reference, state = decoder.prefill(prompt)
        assert np.array_equal(loop.start(prompt), reference)
        for token in forced:  # fills the window exactly
            step, state = decoder.step(state, [token])
            assert np.array_equal(loop.push(token), step[-1]), (kind, state.next_position)
            assert np.array_equal(loop.mask, state.mask) and loop.length == state.next_position
        assert loop.length == CONTEXT


def test_prompt_is_chunked_as_the_bundle_records_unless_told(tmp_path, tiny, monkeypatch):
    """No --prefill-chunk: the bundle's ``prefill_chunk`` (absent: one call); --prefill-chunk N overrides it."""
    import shutil

    sample = load_sample()
    chunks = []
    real_loop = sample.DynamicLoop
    monkeypatch.setattr(sample, "DynamicLoop", lambda bundle, chunk: chunks.append(chunk) or real_loop(bundle, chunk))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny["latent"], bundle)
    config = json.loads((bundle / "qsvd_config.json").read_text())
    for recorded, flag, expected in ((5, [], 5), (5, ["--prefill-chunk", "0"], 0), (None, [], 0),
                                     (None, ["--prefill-chunk", "7"], 7)):
        if recorded is None:
            config.pop("prefill_chunk", None)
        else:
            config["prefill_chunk"] = recorded
        (bundle / "qsvd_config.json").write_text(json.dumps(config))
        assert sample.main([str(bundle), "--ids", "1,2,3,4,5,6,7,8,9,10,11", "--max-new-tokens", "2", *flag]) == 0
        assert chunks[-1] == expected, (recorded, flag)


def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny):
    cases = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "junk": tmp_path / "junk"}
    cases["empty"].mkdir()
    cases["junk"].mkdir()
    (cases["junk"] / "qsvd_config.json").write_text('{"format": "qsvd-export-bundle", "format_version": 1, ')
    expected = {"missing": "bundle folder not found", "empty": "no qsvd_config.json", "junk": "malformed"}
    for name, folder in cases.items():
        result = run_sample(str(folder), "--prompt", "hi")
        assert result.returncode == 2 and result.stdout == "", name
        assert result.stderr.count("\n") == 1 and expected[name] in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    negative = run_sample(str(tiny["dense"]), "--prompt", "hi", "--prefill-chunk", "-1")
    assert negative.returncode == 2 and "--prefill-chunk must be" in negative.stderr
    too_long = run_sample(str(tiny["dense-npu"]), "--prompt", "x" * (CONTEXT + 1))
    assert too_long.returncode == 2 and "does not fit the 48-token context" in too_long.stderr


PIP_OFFLINE = ("Could not find a version", "No matching distribution", "Max retries", "NewConnectionError",
               "Temporary failure in name resolution", "Network is unreachable", "ConnectionError", "timed out")


@pytest.mark.slow
def test_sample_runs_in_a_fresh_virtualenv_on_smollm2(tmp_path):
    """A clean venv with only onnxruntime, tokenizers and numpy (the .venv's versions) runs the sample
    on a real dense bundle and gets DecoderRunner's greedy tokens for a raw prompt."""
    from qsvd_export.bundle import bundle_tokenizer, load_bundle_config
    from qsvd_export.cli.commands import encode_prompt
    from qsvd_export.build.dense import build_dense_bundle

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("onnxruntime", "tokenizers", "numpy")]
    pip = subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=False, capture_output=True,
                         text=True, timeout=1200)
    if pip.returncode != 0:
        if any(marker in pip.stdout + pip.stderr for marker in PIP_OFFLINE):
            pytest.skip(f"pip cannot reach the package index: {(pip.stderr.strip().splitlines() or [''])[-1]}")
        pytest.fail(f"pip install {' '.join(pins)} failed:\n{pip.stderr}")
    blocked = subprocess.run([python, "-c", "import torch"], check=False, capture_output=True)
    assert blocked.returncode != 0  # the fresh venv really lacks torch

    bundle = tmp_path / "smollm2"
    build_dense_bundle("smollm2-135m", bundle)
    prompt_text = "The capital of France is"
    prompt = encode_prompt(bundle_tokenizer(bundle), prompt_text, chat=False)
    reference = DecoderRunner(bundle).generate(prompt, 24, load_bundle_config(bundle).generation["eos_token_ids"])

    result = run_sample(str(bundle), "--prompt", prompt_text, "--max-new-tokens", "24", "--print-ids",
                        python=python, cwd=tmp_path)
    ids, new = sample_ids(result)
    assert ids == prompt and new == reference
    text = bundle_tokenizer(bundle).decode(reference, skip_special_tokens=True)
    assert result.stdout.startswith(text)
