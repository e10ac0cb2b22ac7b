"""Graph-only plans (`qsvd-export model.onnx --budget ...`): no torch model, calibration in ONNX Runtime."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from qsvd_export.cli import main
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.plan.io import load_plan
from qsvd_export.zoo import load_model
from parity import assert_decoder_parity

SMALL = ["--calib-windows", "4", "--calib-length", "64", "-q"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])  # plain, q/k/v bias, fused c_attn
def test_graph_only_plan_gives_a_latent_graph_equal_to_torch_with_that_plan(family, bundles, tmp_path):
    out = tmp_path / "kv50"
    assert main([str(bundles.dense(family) / "model.onnx"), "--budget", "kv=0.5", "-o", str(out), *SMALL]) == 0
    plan = load_plan(out)
    assert plan.r2 <= 0.5 and plan.method["importance"] == "gradient"
    assert plan.calibration["gradients"] == "torch autograd of the graph"
    report = json.loads((out / "report.json").read_text())
    assert all(layer["cache"] == "latent" for layer in report["graph_stage"]["layers"])
    model = apply_plan(copy.deepcopy(load_model(f"tiny-{family}").model), plan)
    assert_decoder_parity(out, model, np.random.default_rng(5).integers(0, 256, (1, 12)), next_token=7)


def test_grad_windows_0_gives_a_gradient_free_plan(bundles, tmp_path):
    out = tmp_path / "energy"
    assert main([str(bundles.dense("llama") / "model.onnx"), "--budget", "kv=0.5", "--grad-windows", "0",
                 "-o", str(out), *SMALL]) == 0
    plan = load_plan(out)
    assert plan.method["importance"] == "energy" and plan.method["whitening"] == "absmean^1"
    assert plan.calibration["gradients"] == "none (--grad-windows 0)"


def test_budget_needs_the_bundle_and_excludes_a_plan(bundles, tmp_path, capsys):
    dense = bundles.dense("llama")
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(dense / name, lone / name)
    assert main([str(lone / "model.onnx"), "--budget", "kv=0.5", "-o", str(tmp_path / "a"), *SMALL]) == 2
    assert "no tokenizer files beside model.onnx: give --tokenizer DIR" in capsys.readouterr().err
    assert main([str(dense / "model.onnx"), "--budget", "kv=0.5", "--plan", str(dense), "-o", str(tmp_path / "b"),
                 *SMALL]) == 2
    assert "cannot be combined with --plan" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_calibration_from_npz_token_windows_equals_the_same_windows_from_text(bundles, tmp_path):
    """The text windows saved as input_ids give the same factors; only the recorded source differs."""
    from qsvd_export.bundle import bundle_tokenizer
    from qsvd_export.data import read_text, token_windows

    dense = bundles.dense("llama")
    windows = token_windows(bundle_tokenizer(dense), read_text("wiki_calib"), 64, 4, source="wiki_calib")
    np.savez(tmp_path / "calib.npz", input_ids=windows.astype(np.int32))
    assert main([str(dense / "model.onnx"), "--budget", "kv=0.5", "-o", str(tmp_path / "text"), *SMALL]) == 0
    assert main([str(dense / "model.onnx"), "--budget", "kv=0.5", "--calib-npz", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "npz"), "-q"]) == 0
    assert (tmp_path / "text" / "plan.safetensors").read_bytes() == (tmp_path / "npz" / "plan.safetensors").read_bytes()
    assert load_plan(tmp_path / "npz").calibration["npz"] == "calib.npz"


@pytest.mark.parametrize("arrays, fragment", [
    ({"tokens": np.zeros((2, 8), np.int64)}, "no 'input_ids' array (has: tokens)"),
    ({"input_ids": np.zeros((2, 8), np.float32)}, "must be integer [windows, tokens]"),
    ({"input_ids": np.zeros(8, np.int64)}, "must be integer [windows, tokens]"),
    ({"input_ids": np.full((2, 8), 10_000, np.int64)}, "must lie in [0, 256)"),
    ({"input_ids": np.array([[None, 1]], dtype=object)}, "not a readable .npz"),  # pickled objects are refused
])
def test_bad_calibration_npz_is_a_one_line_bad_input_error(arrays, fragment, bundles, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "out"
    assert main([str(bundles.dense("llama") / "model.onnx"), "--budget", "kv=0.5", "--calib-npz",
                 str(tmp_path / "bad.npz"), "-o", str(out), "-q"]) == 3
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and not out.exists()


def test_calib_npz_without_budget_is_a_usage_error(bundles, tmp_path, capsys):
    assert main([str(bundles.dense("llama") / "model.onnx"), "--calib-npz", str(tmp_path / "x.npz"),
                 "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "give --budget too" in capsys.readouterr().err


@pytest.fixture(scope="module")
def calibration_images(tmp_path_factory):
    """Six views of matplotlib's bundled photograph (a real image, no download)."""
    from matplotlib import cbook
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        for i in range(6):
            photo.rotate(i * 30).crop((i * 10, 0, 400 + i * 10, 400)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image: skipped by suffix")
    return folder


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_vision_graph_calibrates_on_images_with_gradients_and_parity(family, bundles, calibration_images, tmp_path):
    out = tmp_path / "out"
    assert main([str(bundles.dense(family) / "model.onnx"), "--budget", "params=0.8", "--calib-images",
                 str(calibration_images), "--grad-windows", "3", "-o", str(out), "-q"]) == 0
    plan = load_plan(out)
    assert plan.method["importance"] == "gradient" and plan.calibration["count"] == 6
    assert plan.calibration["normalization"] == "ImageNet default" and plan.r1 <= 0.8
    model = apply_plan(copy.deepcopy(load_model(f"tiny-{family}").model), plan)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_vision_calibration_from_npz_pixel_values_equals_the_same_images_from_files(bundles, calibration_images,
                                                                                    tmp_path):
    from qsvd_export.compress.images import DEFAULT_MEAN, DEFAULT_STD, image_samples

    pixels, _ = image_samples(calibration_images, 32, 32, 128, DEFAULT_MEAN, DEFAULT_STD)
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels)
    vit = str(bundles.dense("vit") / "model.onnx")
    flags = ["--budget", "params=0.8", "--grad-windows", "3", "-q"]
    assert main([vit, *flags, "--calib-images", str(calibration_images), "-o", str(tmp_path / "files")]) == 0
    assert main([vit, *flags, "--calib-npz", str(tmp_path / "pixels.npz"), "-o", str(tmp_path / "npz")]) == 0
    assert (tmp_path / "files" / "plan.safetensors").read_bytes() == (tmp_path / "npz" / "plan.safetensors").read_bytes()


def test_image_calibration_errors_are_one_line(bundles, calibration_images, tmp_path, capsys):
    vit, llama = bundles.dense("vit") / "model.onnx", bundles.dense("llama") / "model.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    np.savez(tmp_path / "pixels.npz", pixel_values=np.zeros((2, 3, 16, 16), np.float32))
    cases = [([str(vit), "--budget", "params=0.8"], 2, "give --calib-images DIR"),
             ([str(vit), "--budget", "params=0.8", "--calib-npz", str(tmp_path / "pixels.npz")], 3,
              "pixel_values must be float [images, 3, 32, 32]"),
             ([str(llama), "--budget", "kv=0.5", "--calib-images", str(calibration_images)], 2, "for vision graphs"),
             ([str(vit), "--budget", "params=0.8", "--calib-images", str(empty)], 3, "no images"),
             ([str(vit), "--budget", "params=0.8", "--calib-images", str(tmp_path / "bad")], 3, "not a readable image"),
             ([str(vit), "--calib-images", str(calibration_images)], 2, "give --budget too")]
    for args, code, fragment in cases:
        assert main([*args, "-o", str(tmp_path / "out"), "-q"]) == code, args
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
