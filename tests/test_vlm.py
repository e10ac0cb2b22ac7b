"""Vision-language bundles (tiny Idefics3 = SmolVLM's architecture, and LLaVA): three chained graphs, one plan
over both towers, image + prompt → the same tokens as transformers."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qsvd_export.compress.budget import parse_budget
from qsvd_export.compress.options import CompressOptions
from qsvd_export.build.compressed import build_compressed_bundle
from qsvd_export.build.request import TargetRequest
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.plan.io import load_plan
from qsvd_export.runtimes.vlm import VisionLanguageRunner, processor_inputs
from qsvd_export.zoo import load_model

skimage_data = pytest.importorskip("skimage.data")

NEW_TOKENS = 12
FAMILIES = ["idefics3", "llava"]


def _image(name: str):  # type: ignore[no-untyped-def]
    from PIL import Image

    return Image.fromarray(getattr(skimage_data, name)())


def _inputs(loaded, name: str, prompt: str) -> tuple[list[int], np.ndarray]:  # type: ignore[no-untyped-def]
    return processor_inputs(loaded.processor, _image(name), prompt, chat=False)


def _model_pixels(family: str, pixel_values: np.ndarray) -> torch.Tensor:
    """The runner's frames [frames, 3, S, S] as the transformers model takes them."""
    pixels = torch.from_numpy(pixel_values)
    return pixels[None] if family == "idefics3" else pixels


def _torch_tokens(family: str, model, ids: list[int], pixel_values: np.ndarray) -> list[int]:  # type: ignore[no-untyped-def]
    out = model.generate(input_ids=torch.tensor([ids]), pixel_values=_model_pixels(family, pixel_values),
                         max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:  # type: ignore[no-untyped-def]
    return request.param


@pytest.fixture(scope="module")
def tiny_vlm(family: str):  # type: ignore[no-untyped-def]
    return load_model(f"tiny-{family}")


@pytest.fixture(scope="module")
def dense_vlm(bundles, family: str) -> Path:  # type: ignore[no-untyped-def]
    return bundles.dense(family)


@pytest.fixture(scope="module")
def compressed_vlm(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    out = tmp_path_factory.mktemp("vlm") / f"compressed-{family}"
    options = CompressOptions(budget=parse_budget("params=0.7,kv=0.5"), calib_windows=8, calib_length=32,
                              grad_windows=4, min_rank=4)
    build_compressed_bundle(f"tiny-{family}", options, out)
    return out


def test_dense_bundle_chains_three_graphs(dense_vlm: Path, family: str) -> None:
    config = json.loads((dense_vlm / "qsvd_config.json").read_text())
    assert config["kind"] == "vlm"
    assert [(g["role"], g["inputs"][0], g["outputs"][0]) for g in config["graphs"]] == [
        ("vision", "pixel_values", "image_features"), ("embed", "input_ids", "inputs_embeds"),
        ("model", "inputs_embeds", "logits")]
    features = {"idefics3": 4, "llava": 16}[family]  # pixel shuffle 4×: 16 patches → 4; LLaVA: 16 patches (CLS dropped)
    assert config["model_config"]["vlm"] == {"image_token_id": 258, "image_seq_len": features, "image_size": 32,
                                             "vision_hidden_size": 32, "vision_layers": 2, "vision_heads": 4}
    assert "processor_config.json" in config["tokenizer_files"]
    assert "## Chaining the graphs" in (dense_vlm / "README.md").read_text()


@pytest.mark.parametrize("image, prompt", [("astronaut", "Who is this?"), ("chelsea", "Describe the animal.")])
def test_full_rank_tokens_equal_transformers(dense_vlm: Path, tiny_vlm, family: str, image: str,  # type: ignore[no-untyped-def]
                                             prompt: str) -> None:
    ids, pixel_values = _inputs(tiny_vlm, image, prompt)
    assert pixel_values.shape[0] == (5 if family == "idefics3" else 1)  # 2 × 2 tiles + the global frame
    ours = VisionLanguageRunner(dense_vlm).generate(ids, pixel_values, NEW_TOKENS)
    assert ours == _torch_tokens(family, tiny_vlm.model, ids, pixel_values)


def test_vision_graph_equals_transformers_image_features(dense_vlm: Path, tiny_vlm, family: str) -> None:  # type: ignore[no-untyped-def]
    ids, pixel_values = _inputs(tiny_vlm, "coffee", "x")
    ours = VisionLanguageRunner(dense_vlm).image_features(pixel_values)
    config = tiny_vlm.model.config
    extra = {} if family == "idefics3" else {"vision_feature_layer": config.vision_feature_layer,
                                             "vision_feature_select_strategy": config.vision_feature_select_strategy}
    with torch.no_grad():
        ref = tiny_vlm.model.model.get_image_features(_model_pixels(family, pixel_values), **extra).pooler_output
    np.testing.assert_allclose(ours.reshape(-1, ours.shape[-1]), torch.cat(ref).numpy(), atol=1e-5)


def test_one_plan_covers_both_towers_under_one_budget(compressed_vlm: Path, family: str) -> None:
    plan = load_plan(compressed_vlm)
    vision_layers = {"idefics3": 2, "llava": 1}[family]  # LLaVA reads layer -2: the last CLIP layer is unused
    assert [layer.graph for layer in plan.layers] == ["vision"] * vision_layers + ["model", "model"]
    assert plan.r1 <= 0.7 + 1e-9 and plan.r2 <= 0.5 + 1e-9
    assert any(layer.groups for layer in plan.layers if layer.graph == "vision")  # the vision tower shares the budget
    assert all(layer.cost()[1] == 0 for layer in plan.layers if layer.graph == "vision")  # and has no cache
    assert plan.calibration["images"]["count"] == 8 and plan.calibration["prompt_length"] > 0
    report = json.loads((compressed_vlm / "report.json").read_text())
    assert report["graph_stage_vision"]["layers"] and report["graph_stage"]["layers"]
    config = json.loads((compressed_vlm / "qsvd_config.json").read_text())
    assert {layer["kind"] for layer in config["cache"]} == {"latent"}


def test_compressed_bundle_matches_the_plan_in_torch(compressed_vlm: Path, tiny_vlm, family: str) -> None:  # type: ignore[no-untyped-def]
    model = apply_plan(copy.deepcopy(tiny_vlm.model), load_plan(compressed_vlm))
    ids, pixel_values = _inputs(tiny_vlm, "rocket", "What is in the picture?")
    runner = VisionLanguageRunner(compressed_vlm)
    logits, _ = runner.decoder.prefill(runner.prompt_embeddings(np.asarray([ids]), pixel_values))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), pixel_values=_model_pixels(family, pixel_values)).logits
    assert np.abs(logits - ref.numpy()).max() <= 1e-4
    runner.decoder.prefill_chunk = 7  # embeddings fed in chunks through the latent cache
    chunked, _ = runner.decoder.prefill(runner.prompt_embeddings(np.asarray([ids]), pixel_values))
    assert len(ids) > 7 and np.abs(chunked - ref.numpy()).max() <= 1e-4
    assert runner.generate(ids, pixel_values, NEW_TOKENS) == _torch_tokens(family, model, ids, pixel_values)


def test_kv_only_budget_leaves_the_vision_tower_dense(tiny_vlm) -> None:  # type: ignore[no-untyped-def]
    from qsvd_export.compress.compressor import compress_model

    options = CompressOptions(budget=parse_budget("kv=0.5"), calib_windows=4, calib_length=16, grad_windows=0,
                              min_rank=4)
    plan = compress_model(tiny_vlm, options)
    assert all(not layer.groups for layer in plan.layers if layer.graph == "vision")
    assert plan.r2 <= 0.5 + 1e-9


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsvd_export", *args], capture_output=True, text=True, timeout=300)


def test_cli_run_with_an_image(compressed_vlm: Path, tmp_path: Path, tiny_vlm) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "cat.png"
    _image("chelsea").save(image)
    done = _cli("run", str(compressed_vlm), "--image", str(image), "--prompt", "What is this?",
                "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    ids, pixel_values = processor_inputs(tiny_vlm.processor, _image("chelsea").convert("RGB"), "What is this?", False)
    expected = VisionLanguageRunner(compressed_vlm).generate(ids, pixel_values, 6)
    assert done.stdout.rstrip("\n") == tiny_vlm.processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_cpu_target_quantizes_all_three_graphs_and_stays_close(dense_vlm: Path, tiny_vlm, family: str,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    from qsvd_export.build.dense import build_dense_bundle

    out = tmp_path / "cpu"
    report = build_dense_bundle(f"tiny-{family}", out, target=TargetRequest("cpu")).report
    graphs = report["target"]["graphs"]
    assert graphs["vision"]["quantized_matmuls"] > 0 and graphs["model"]["quantized_matmuls"] > 0
    assert graphs["embed"]["quantized_embeddings"] == 1
    assert all(g["onnxruntime_optimized_graph"]["float_matmuls_with_constant_weight"] == 0 for g in graphs.values())
    ids, pixel_values = _inputs(tiny_vlm, "astronaut", "What is it?")
    logits = {}
    for name, bundle in (("fp32", dense_vlm), ("cpu", out)):
        runner = VisionLanguageRunner(bundle)
        logits[name], _ = runner.decoder.prefill(runner.prompt_embeddings(np.asarray([ids]), pixel_values))
    spread = np.abs(logits["fp32"]).max()
    assert 0 < np.abs(logits["cpu"] - logits["fp32"]).max() <= 0.05 * spread  # int8 weights: close, not equal


def test_gpu_target_writes_float16_graphs_the_runner_drives(dense_vlm: Path, tiny_vlm, family: str,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    from qsvd_export.build.dense import build_dense_bundle

    out = tmp_path / "gpu"
    report = build_dense_bundle(f"tiny-{family}", out, target=TargetRequest("gpu", "fp")).report
    assert all("float16" in report["target"]["graphs"][role] for role in ("vision", "embed", "model"))
    config = json.loads((out / "qsvd_config.json").read_text())
    assert {t["dtype"] for layer in config["cache"] for t in layer["tensors"]} == {"float16"}
    ids, pixel_values = _inputs(tiny_vlm, "astronaut", "What is it?")
    logits = {}
    for name, bundle in (("fp32", dense_vlm), ("fp16", out)):  # fp16 graphs on the CPU EP here
        runner = VisionLanguageRunner(bundle)
        logits[name], _ = runner.decoder.prefill(runner.prompt_embeddings(np.asarray([ids]), pixel_values))
    assert logits["fp16"].dtype == np.float32  # logits stay fp32
    assert np.abs(logits["fp16"] - logits["fp32"]).max() <= 0.02 * np.abs(logits["fp32"]).max()
    assert len(VisionLanguageRunner(out).generate(ids, pixel_values, 4)) == 4


@pytest.mark.parametrize("args, message", [
    (["run", "{vlm}", "--prompt", "x"], "give --image FILE"),
    (["run", "{vlm}", "--prompt", "x", "--image", "{missing}"], "image file not found"),
    (["run", "{vlm}", "--prompt", "x", "--image", "{text}"], "not a readable image"),
    (["export", "tiny-idefics3", "-o", "{out}", "--target", "npu"], "--target npu is not supported for vision-language"),
    (["export", "tiny-idefics3", "-o", "{out}", "--mobile"], "--mobile is not supported for vision-language"),
    (["compress", "tiny-llama", "--budget", "kv=0.5", "-o", "{out}", "--calib-images", "{tmp}"],
     "--calib-images is for vision-language models"),
])
def test_cli_refuses_with_one_line(compressed_vlm: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "note.txt").write_text("not an image")
    names = {"vlm": str(compressed_vlm), "missing": str(tmp_path / "none.png"), "text": str(tmp_path / "note.txt"),
             "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    done = _cli(*(a.format(**names) for a in args))
    assert done.returncode in (2, 3), done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("qsvd-export: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_same_inputs_give_the_same_bytes(dense_vlm: Path, family: str, tmp_path: Path) -> None:
    from qsvd_export.build.dense import build_dense_bundle

    again = tmp_path / "again"
    build_dense_bundle(f"tiny-{family}", again)
    names = sorted(p.name for p in dense_vlm.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    differ = [n for n in names if n != "timings.json" and (dense_vlm / n).read_bytes() != (again / n).read_bytes()]
    assert differ == []
