"""Graphs from the legacy TorchScript exporter (``torch.onnx.export(dynamo=False)``, opset 17): upgraded to
opset 21 at load, their attention blocks found, and a torch-stage plan applied with parity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qsvd_export.cli import main
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.plan.io import load_plan
from qsvd_export.tiny import build_tiny
from parity import assert_decoder_parity

SMALL = {"bert": ["--budget", "params=0.8", "--calib-length", "16"]}
DECODER_SMALL = ["--budget", "params=0.8", "--calib-length", "64"]


class _LastHidden(torch.nn.Module):
    """input_ids, attention_mask → the model's first output (no cache: what older export scripts wrote)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "gemma3", "gpt2"])  # gpt2: fused c_attn (Gemm + Split)
def test_legacy_torchscript_export_gets_the_plan_with_parity(family, tmp_path, capfd):
    model = build_tiny(family).model
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}}
    example = (torch.randint(0, 256, (1, 8)), torch.ones(1, 8, dtype=torch.long))
    graph = tmp_path / "legacy.onnx"
    torch.onnx.export(_LastHidden(model), example, str(graph), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["out"], dynamic_axes=axes)
    plan = tmp_path / "plan"
    assert main(["compress", f"tiny-{family}", *SMALL.get(family, DECODER_SMALL), "--calib-windows", "4", "--grad-windows", "2",
                 "-o", str(plan), "-q"]) == 0
    capfd.readouterr()  # drop the compress step's output: the check below is the graph stage's own
    out = tmp_path / "out"
    assert main([str(graph), "--plan", str(plan), "-o", str(out), "-q"]) == 0
    captured = capfd.readouterr()  # read once (a second read is already drained); fd level: native logs too
    assert f"{model.config.num_hidden_layers} attention blocks" in captured.out
    assert captured.err == ""  # the opset upgrade is silent under -q
    # a fresh copy: the legacy exporter leaves the traced model altered (its outputs drift by ~2 afterwards)
    reference_model = apply_plan(build_tiny(family).model, load_plan(plan))
    ids = np.random.default_rng(0).integers(0, 256, (2, 11))
    mask = np.ones_like(ids)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        expected = reference_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
    assert np.abs(got - expected).max() <= 1e-4


def _legacy_graph(family: str, folder) -> tuple:
    """A bare folder holding only the legacy export, and a model folder holding only its config.json."""
    model = build_tiny(family).model
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}}
    example = (torch.randint(0, 256, (1, 8)), torch.ones(1, 8, dtype=torch.long))
    (folder / "bare").mkdir()
    graph = folder / "bare" / "legacy.onnx"
    torch.onnx.export(_LastHidden(model), example, str(graph), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["out"], dynamic_axes=axes)
    model.config.save_pretrained(folder / "model")
    return graph, folder / "model"


def test_bare_legacy_graph_gets_the_torch_stage_plan_from_its_own_gradients(tmp_path):
    """No bundle: --tokenizer gives the head counts (config.json), --calib-npz the windows; the graph's own
    gradients (it is upgraded from opset 17 first) choose the torch stage's ranks on those windows."""
    from qsvd_export.compress.budget import parse_budget
    from qsvd_export.compress.compressor import compress_model
    from qsvd_export.compress.options import CompressOptions

    from transformers import AutoTokenizer

    from qsvd_export.bundle import bundle_tokenizer, load_bundle_config
    from qsvd_export.zoo import load_model

    graph, model_dir = _legacy_graph("bert", tmp_path)
    minilm = load_model("minilm-l6").weights_dir  # a real tokenizer to travel into the bundle
    AutoTokenizer.from_pretrained(minilm).save_pretrained(model_dir)
    windows = np.random.default_rng(1).integers(0, 256, (6, 16)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=windows)
    out = tmp_path / "out"
    assert main([str(graph), "--budget", "params=0.8", "--tokenizer", str(model_dir), "--calib-npz",
                 str(tmp_path / "calib.npz"), "--grad-windows", "4", "-o", str(out), "-q"]) == 0
    plan = load_plan(out)
    assert plan.method["importance"] == "gradient" and plan.model == "legacy"
    bundle = load_bundle_config(out)
    assert bundle.kind == "encoder" and bundle.model_config["num_attention_heads"] == 4 and "tokenizer.json" in bundle.tokenizer_files
    assert bundle_tokenizer(out)("hello world")["input_ids"] == AutoTokenizer.from_pretrained(minilm)("hello world")["input_ids"]
    options = CompressOptions(parse_budget("params=0.8"), calib_windows=6, calib_length=16, grad_windows=4)
    reference = compress_model(build_tiny("bert"), options, windows)
    assert [[(g.members, g.rank) for g in la.groups] for la in plan.layers] == \
        [[(g.members, g.rank) for g in la.groups] for la in reference.layers]


def test_bare_graph_without_a_config_takes_its_head_counts_from_its_reshapes(tmp_path, capsys):
    """No config.json anywhere: the heads come from the graph's head-split Reshapes (4 of 16); a tokenizer
    folder without config.json is enough for --tokenizer."""
    from qsvd_export.bundle import load_bundle_config

    graph, model_dir = _legacy_graph("bert", tmp_path)
    (model_dir / "config.json").unlink()
    np.savez(tmp_path / "calib.npz", input_ids=np.zeros((2, 8), np.int64))
    for i, extra in enumerate(([], ["--tokenizer", str(model_dir)])):
        if extra:  # a folder with only tokenizer files is accepted
            from transformers import AutoTokenizer

            from qsvd_export.zoo import load_model

            AutoTokenizer.from_pretrained(load_model("minilm-l6").weights_dir).save_pretrained(model_dir)
            assert not (model_dir / "config.json").exists()
        out = tmp_path / f"out{i}"
        assert main([str(graph), "--budget", "params=0.8", "--calib-npz", str(tmp_path / "calib.npz"), *extra,
                     "--grad-windows", "0", "-o", str(out), "-q"]) == 0
        config = load_bundle_config(out).model_config
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 4, 16)


class _WithCache(torch.nn.Module):
    """optimum-style I/O: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value → logits,
    present.{i}.key/value, the cache passed as flat tensors (what a TorchScript export needs)."""

    def __init__(self, model: torch.nn.Module) -> None:
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_legacy_export_with_a_kv_cache_gets_a_latent_cache_with_parity(family, tmp_path):
    model = build_tiny(family).model
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = [torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    example = (torch.randint(0, 256, (1, 4)), torch.ones(1, 7, dtype=torch.long), torch.arange(3, 7)[None], *past)
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(layers)
                                                                for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"},
            "logits": {0: "b", 1: "s"}, **{n: {0: "b", 2: "p"} for n in names[3:]}, **{n: {0: "b", 2: "t"} for n in outputs[1:]}}
    graph = tmp_path / "legacy.onnx"
    torch.onnx.export(_WithCache(model), example, str(graph), dynamo=False, opset_version=17, input_names=names,
                      output_names=outputs, dynamic_axes=axes)
    plan = tmp_path / "plan"
    assert main(["compress", f"tiny-{family}", "--budget", "kv=0.5", "--calib-windows", "4", "--grad-windows", "2",
                 "--calib-length", "64", "-o", str(plan), "-q"]) == 0
    out = tmp_path / "out"
    assert main([str(graph), "--plan", str(plan), "-o", str(out), "-q"]) == 0
    reference_model = apply_plan(build_tiny(family).model, load_plan(plan))
    runner = assert_decoder_parity(out, reference_model, np.random.default_rng(4).integers(0, 256, (1, 9)), next_token=7)
    assert runner.config.cache and all(layer.kind == "latent" for layer in runner.config.cache)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_bare_legacy_vision_export_calibrates_on_images_with_parity(family, tmp_path):
    """A ViT/DINOv2 TorchScript export in a bare folder: config.json gives the heads, images the statistics."""
    from PIL import Image

    class Pixels(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values)[0]

    model = build_tiny(family).model
    size = model.config.image_size
    (tmp_path / "bare").mkdir()
    graph = tmp_path / "bare" / "vision.onnx"
    torch.onnx.export(Pixels(model), (torch.randn(1, 3, size, size),), str(graph), dynamo=False, opset_version=17,
                      input_names=["pixel_values"], output_names=["out"], dynamic_axes={"pixel_values": {0: "b"}, "out": {0: "b"}})
    model.config.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert main([str(graph), "--budget", "params=0.8", "--calib-images", str(images), "--tokenizer",
                 str(tmp_path / "model"), "--grad-windows", "2", "-o", str(out), "-q"]) == 0
    plan = load_plan(out)
    assert plan.method["importance"] == "gradient"
    reference = Pixels(apply_plan(build_tiny(family).model, plan))
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels)).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_fused_attention_graph_is_declined_with_the_reason(tmp_path, capsys):
    """An onnxruntime-genai style decoder (com.microsoft GroupQueryAttention) has no Q·Kᵀ/Softmax/P·V to
    rewrite: the plan is refused, naming the fused op, and nothing is written."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {n: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("wq", (64, 64)), ("wk", (64, 32)), ("wv", (64, 32)), ("wo", (64, 256)))}
    nodes = [helper.make_node("MatMul", ["x", w], [w + "_out"]) for w in ("wq", "wk", "wv")]
    nodes.append(helper.make_node(
        "GroupQueryAttention", ["wq_out", "wk_out", "wv_out", "past_key", "past_value", "seqlens_k", "total_len"],
        ["attn", "present_key", "present_value"], domain="com.microsoft", num_heads=4, kv_num_heads=2))
    nodes.append(helper.make_node("MatMul", ["attn", "wo"], ["logits"]))
    graph = helper.make_graph(
        nodes, "genai",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 64]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [1, 2, "p", 16]),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [1, 2, "p", 16]),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total_len", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 256])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, "t", 16]) for n in ("present_key", "present_value")],
        list(weights.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "genai.onnx"
    onnx.save(model, path)
    plan = tmp_path / "plan"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "--calib-windows", "4", "--calib-length", "32",
                 "--grad-windows", "2", "-o", str(plan), "-q"]) == 0
    out = tmp_path / "out"
    assert main([str(path), "--plan", str(plan), "-o", str(out), "-q"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0 attention blocks" in err
    assert "fused com.microsoft::GroupQueryAttention op" in err and not out.exists()
