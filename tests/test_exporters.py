"""Graphs written by real exporters with the models' default sdpa attention (not this project's eager
export): the TorchScript exporter (``dynamo=False``, opset 17; optimum uses it too) and the dynamo
exporter. Their sdpa lowering puts a NaN guard ``Where(IsNaN(P), 0, P)`` between Softmax and P·V and
scales Q and K by √scale each before Q·Kᵀ. Bare folders (no config): head counts come from the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qsvd_export.cli import main
from qsvd_export.compress.apply_plan import apply_plan
from qsvd_export.plan.io import load_plan
from qsvd_export.tiny import build_tiny
from parity import assert_decoder_parity
from tests.test_legacy_export import _WithCache

VISION = ("vit", "dinov2")
DECODERS = ("llama", "qwen2")


class _Outputs(torch.nn.Module):
    """Text: (input_ids, attention_mask) → first output; vision: pixel_values → first output."""

    def __init__(self, model: torch.nn.Module, vision: bool) -> None:
        super().__init__()
        self.model, self.vision = model, vision

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.vision:
            return self.model(pixel_values=inputs[0])[0]
        return self.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False)[0]


def _sdpa(family: str) -> torch.nn.Module:
    model = build_tiny(family).model
    model.set_attn_implementation("sdpa")
    return model


def _export(family: str, exporter: str, path) -> None:
    """``family``'s tiny model with sdpa attention written by ``exporter`` to ``path``: legacy (TorchScript,
    opset 17), dynamo (its default opset), dynamo23 (opset 23: ONNX Attention and RotaryEmbedding ops)."""
    vision = family in VISION
    wrapper = _Outputs(_sdpa(family), vision)
    if vision:
        example, names = (torch.randn(1, 3, 32, 32),), ["pixel_values"]
    else:
        example, names = (torch.randint(0, 256, (1, 8)), torch.ones(1, 8, dtype=torch.long)), ["input_ids", "attention_mask"]
    path.parent.mkdir(parents=True, exist_ok=True)
    output = ["logits" if family in DECODERS else "out"]  # a decoder graph is known by its logits output
    if exporter == "legacy":
        axes = {n: ({0: "b"} if vision else {0: "b", 1: "s"}) for n in names}
        torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=output, dynamic_axes=axes)
    else:
        batch, seq = torch.export.Dim("b"), torch.export.Dim("s", min=2)
        shapes = (({0: batch},) if vision else ({0: batch, 1: seq}, {0: batch, 1: seq}),)
        opset = {"opset_version": 23} if exporter == "dynamo23" else {}
        torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=names, output_names=output,
                          dynamic_shapes=shapes, external_data=False, **opset)


def _images(folder) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "vit"])
def test_sdpa_export_in_a_bare_folder_gets_a_graph_only_plan_equal_to_torch(family, exporter, tmp_path):
    graph = tmp_path / "bare" / "model.onnx"
    _export(family, exporter, graph)
    args = [str(graph), "--budget", "params=0.8", "--grad-windows", "2", "-o", str(tmp_path / "out"), "-q"]
    if family in VISION:
        _images(tmp_path / "images")
        args += ["--calib-images", str(tmp_path / "images")]
    else:
        np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(1).integers(0, 256, (4, 16)))
        args += ["--calib-npz", str(tmp_path / "calib.npz")]
    assert main(args) == 0
    out = tmp_path / "out"
    bundle = json.loads((out / "qsvd_config.json").read_text())
    assert (bundle["model_config"]["num_attention_heads"], bundle["model_config"]["head_dim"]) == (4, 16)
    report = json.loads((out / "report.json").read_text())
    assert report["graph_stage"]["attention_blocks"] == 2 and not report["graph_stage"]["unmatched"]
    plan = load_plan(out)
    assert plan.r1 <= 0.8 and plan.method["importance"] == "gradient"
    assert plan.calibration["gradients"] == "torch autograd of the graph"  # IsNaN, GatherND differentiable
    if family not in VISION:  # the graph's gradients choose the torch stage's ranks on the same windows
        from qsvd_export.compress.budget import parse_budget
        from qsvd_export.compress.compressor import compress_model
        from qsvd_export.compress.options import CompressOptions

        options = CompressOptions(parse_budget("params=0.8"), calib_windows=4, calib_length=16, grad_windows=2)
        torch_plan = compress_model(build_tiny(family), options, np.load(tmp_path / "calib.npz")["input_ids"])
        assert [[(g.members, g.rank) for g in la.groups] for la in plan.layers] == \
            [[(g.members, g.rank) for g in la.groups] for la in torch_plan.layers]
    reference = _Outputs(apply_plan(build_tiny(family).model, plan), family in VISION)
    rng = np.random.default_rng(3)
    if family in VISION:
        feed = {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    else:
        ids = rng.integers(0, 256, (2, 11))
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        expected = reference(*[torch.from_numpy(v) for v in feed.values()]).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert main([str(graph), "--target", "cpu", "-o", str(tmp_path / "cpu"), "-q"]) == 0  # the dense graph quantizes
    assert json.loads((tmp_path / "cpu" / "report.json").read_text())["target"]["quantized_matmuls"] > 0


def test_the_nan_guard_is_what_used_to_hide_the_blocks(tmp_path):
    """Without following ``Where(IsNaN(P), 0, P)`` the legacy sdpa graph has no attention block at all."""
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes import find_attention as module

    graph = tmp_path / "model.onnx"
    _export("llama", "legacy", graph)
    model = load_onnx(graph)
    assert len(module.find_attention(model).blocks) == 2
    original = module._is_nan_guard
    module._is_nan_guard = lambda node, value: False
    try:
        failures = module.find_attention(model).failures
    finally:
        module._is_nan_guard = original
    assert [f.reason for f in failures] == ["Softmax output does not feed a P·V MatMul"] * 2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_opset23_attention_op_is_unfused_and_gets_a_plan_equal_to_torch(family, tmp_path, monkeypatch, capsys):
    """The dynamo exporter at opset 23 writes sdpa as one ONNX ``Attention`` op (and llama's RoPE as
    ``RotaryEmbedding``): the op is rewritten into MatMul/Softmax/MatMul first. Without that rewrite the
    graph has nothing to compress (checked by turning it off)."""
    import onnx

    graph = tmp_path / "bare" / "model.onnx"
    _export(family, "dynamo23", graph)
    assert [n.op_type for n in onnx.load(graph).graph.node].count("Attention") == 2
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(1).integers(0, 256, (4, 16)))
    args = [str(graph), "--budget", "params=0.8", "--grad-windows", "2", "--calib-npz", str(tmp_path / "calib.npz"), "-q"]
    out = tmp_path / "out"
    assert main([*args, "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["unfused_attention"] == {"rewritten": 2, "left": []}
    assert report["graph_stage"]["attention_blocks"] == 2
    plan = load_plan(out)
    reference = _Outputs(apply_plan(build_tiny(family).model, plan), False)
    ids = np.random.default_rng(3).integers(0, 256, (1, 11))  # batch 1: onnxruntime's RotaryEmbedding rejects 2
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        expected = reference(*[torch.from_numpy(v) for v in feed.values()]).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    if family == "bert":
        import qsvd_export.passes.unfuse_attention as unfuse

        capsys.readouterr()
        monkeypatch.setattr(unfuse, "unfuse_attention", lambda model: (0, []))
        assert main([*args, "-o", str(tmp_path / "off")]) == 2
        assert "fused ai.onnx::Attention op" in capsys.readouterr().err


@pytest.fixture(scope="module")
def optimum_folder(tmp_path_factory):
    """What optimum's text-generation-with-past export writes: model.onnx (TorchScript exporter, sdpa,
    opset 17) beside config.json and tokenizer files, no qsvd_config.json. The tokenizer is byte-level
    (ids 0–255 for text, as the tiny vocabulary needs)."""
    from qsvd_export.tiny import _vlm_tokenizer

    folder = tmp_path_factory.mktemp("optimum")
    model = _sdpa("llama")
    config = model.config
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    past = [torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    example = (torch.randint(0, 256, (1, 4)), torch.ones(1, 7, dtype=torch.long), torch.arange(3, 7)[None], *past)
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(layers)
                                                                for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"},
            "logits": {0: "b", 1: "s"}, **{n: {0: "b", 2: "p"} for n in names[3:]},
            **{n: {0: "b", 2: "t"} for n in outputs[1:]}}
    torch.onnx.export(_WithCache(model), example, str(folder / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=names, output_names=outputs, dynamic_axes=axes)
    config.save_pretrained(folder)
    _vlm_tokenizer().save_pretrained(folder)
    return folder


def test_optimum_style_folder_compresses_from_its_own_files_with_parity(optimum_folder, tmp_path):
    out = tmp_path / "kv50"
    assert main([str(optimum_folder / "model.onnx"), "--budget", "kv=0.5", "--calib-windows", "4", "--calib-length",
                 "64", "--grad-windows", "2", "-o", str(out), "-q"]) == 0
    plan = load_plan(out)
    assert plan.r2 <= 0.5 and plan.calibration["text"] == "wiki_calib.txt"
    bundle = json.loads((out / "qsvd_config.json").read_text())
    assert "tokenizer.json" in bundle["tokenizer_files"] and bundle["source"]["model_folder"] == "beside the graph"
    assert all(layer["kind"] == "latent" for layer in bundle["cache"])
    # the sdpa repeat_kv (computed Expand/Reshape shapes) is made constant, so V folds: no per-step rebuild
    layers = json.loads((out / "report.json").read_text())["graph_stage"]["layers"]
    assert all("V up-projection applied after attention weights" in layer["notes"] for layer in layers), layers
    assert_decoder_parity(out, apply_plan(build_tiny("llama").model, plan),
                          np.random.default_rng(4).integers(0, 256, (1, 9)), next_token=7)


def test_optimum_style_folder_builds_for_cpu_and_npu(optimum_folder, tmp_path):
    """cpu: the sdpa graph quantizes. npu: the sdpa lowering's boolean mask and NaN guard are replaced by the
    project's float mask (canonical_mask), so the static graphs compile whole on QNN HTP with CPU fallback
    disabled (when onnxruntime-qnn is installed; --strict checks the op set either way)."""
    assert main([str(optimum_folder / "model.onnx"), "--target", "cpu", "-o", str(tmp_path / "cpu"), "-q"]) == 0
    assert json.loads((tmp_path / "cpu" / "report.json").read_text())["target"]["quantized_matmuls"] > 0
    out = tmp_path / "npu"
    assert main([str(optimum_folder / "model.onnx"), "--target", "npu", "--context-length", "48", "--prefill-length",
                 "8", "--strict", "-o", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["canonical_attention_rewrites"] >= 2  # at least the two layers' masks
    check = report["target"].get("verification") or {}
    if check and not check["qnn"].startswith("skipped"):
        assert check["qnn"] == "compiled" and check["tokens_match"], check


def test_a_mask_that_is_not_the_causal_one_is_kept(optimum_folder, tmp_path):
    """canonical_mask checks the original mask on sample feeds: a graph whose mask also hides the key just
    before the diagonal (not HF's causal + padding mask) keeps its own mask, and its NaN guards."""
    import onnx_ir as ir

    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes.canonical_mask import _mask_operand, canonicalize_masks
    from qsvd_export.passes.find_attention import find_attention

    model = load_onnx(optimum_folder / "model.onnx")
    blocks = find_attention(model).blocks
    add, side = _mask_operand(blocks[0])
    operand = add.inputs[side]
    # shift the mask one key to the right: the Softmax then sees another mask
    pad = ir.Value(name="pad_one")
    pads = ir.Value(name="pads", const_value=ir.tensor(np.asarray([0, 0, 0, 1, 0, 0, 0, 0], np.int64)))
    model.graph.initializers["pads"] = pads
    model.graph.insert_before(add, ir.Node("", "Pad", [operand, pads], outputs=[pad]))  # key j gets j−1's mask
    starts = ir.Value(name="s0", const_value=ir.tensor(np.asarray([0], np.int64)))
    ends = ir.Value(name="e0", const_value=ir.tensor(np.asarray([-1], np.int64)))
    axes = ir.Value(name="a0", const_value=ir.tensor(np.asarray([3], np.int64)))
    for value in (starts, ends, axes):
        model.graph.initializers[value.name] = value
    sliced = ir.Value(name="shifted")
    model.graph.insert_before(add, ir.Node("", "Slice", [pad, starts, ends, axes], outputs=[sliced]))
    add.replace_input_with(side, sliced)
    done, left = canonicalize_masks(model, blocks)
    assert done == 1 and len(left) == 1 and "block 0: mask kept" in left[0], left
    assert "IsNaN" in [n.op_type for n in model.graph]


def test_tokenizer_flag_works_without_budget(optimum_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((optimum_folder / "model.onnx").read_bytes())
    out = tmp_path / "out"
    assert main([str(bare / "model.onnx"), "--tokenizer", str(optimum_folder), "-o", str(out), "-q"]) == 0
    bundle = json.loads((out / "qsvd_config.json").read_text())
    assert bundle["model_type"] == "llama" and "tokenizer.json" in bundle["tokenizer_files"]


@pytest.mark.parametrize("change, fragment", [
    ({"num_attention_heads": 5}, "5 heads / 2 kv heads"),  # does not divide the 64-wide Q
    ({"num_attention_heads": 8, "head_dim": 8, "num_key_value_heads": 4}, "reshapes split Q into 4 heads"),
])
def test_a_config_that_contradicts_the_graph_is_refused_by_name(change, fragment, optimum_folder, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for item in optimum_folder.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    for extra in ([], ["--budget", "kv=0.5", "--calib-windows", "2", "--calib-length", "16"]):
        out = tmp_path / "out"
        assert main([str(folder / "model.onnx"), *extra, "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config.json contradicts the graph" in err and fragment in err, err
        assert "internal error" not in err and not out.exists()


def test_a_bare_vision_graph_asks_for_images_never_a_tokenizer(tmp_path, capsys):
    graph = tmp_path / "bare" / "model.onnx"
    _export("vit", "legacy", graph)
    assert main([str(graph), "--budget", "params=0.8", "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "give --calib-images DIR" in err and "tokenizer" not in err
    assert main([str(graph), "--target", "npu", "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "vision graph: target npu builds static decoder graphs" in err and "tokenizer" not in err


def test_a_graph_with_matmulnbits_weights_is_refused_by_name(tmp_path, capsys):
    """Weights already quantized by onnxruntime's MatMulNBits quantizer (what int4 genai-builder graphs
    hold): there are no float Q/K/V weights to factor, and the refusal says so."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = tmp_path / "model.onnx"
    _export("llama", "legacy", graph)
    quantizer = MatMulNBitsQuantizer(onnx.load(graph), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp_path / "int4.onnx"), use_external_data_format=False)
    np.savez(tmp_path / "calib.npz", input_ids=np.zeros((2, 8), np.int64))
    out = tmp_path / "out"
    assert main([str(tmp_path / "int4.onnx"), "--budget", "kv=0.5", "--calib-npz", str(tmp_path / "calib.npz"),
                 "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already quantized (com.microsoft::MatMulNBits)" in err and not out.exists()


def test_a_genai_config_beside_the_graph_is_read_and_checked(optimum_folder, tmp_path, capsys):
    """onnxruntime-genai's builder writes genai_config.json (model.decoder: head counts, head_size): it serves
    as the folder's config, and a contradiction names that file."""
    folder = tmp_path / "genai"
    folder.mkdir()
    for item in optimum_folder.iterdir():
        if item.name != "config.json":
            (folder / item.name).write_bytes(item.read_bytes())
    decoder = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_size": 16, "hidden_size": 64,
               "num_hidden_layers": 2}
    genai = {"model": {"type": "llama", "vocab_size": 256, "context_length": 4096, "decoder": decoder}}
    (folder / "genai_config.json").write_text(json.dumps(genai))
    assert main([str(folder / "model.onnx"), "-o", str(tmp_path / "ok"), "-q"]) == 0
    bundle = json.loads((tmp_path / "ok" / "qsvd_config.json").read_text())
    assert bundle["model_type"] == "llama" and bundle["model_config"]["num_key_value_heads"] == 2
    decoder["num_key_value_heads"] = 4
    (folder / "genai_config.json").write_text(json.dumps(genai))
    assert main([str(folder / "model.onnx"), "-o", str(tmp_path / "bad"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "genai_config.json contradicts the graph" in err and len(err.splitlines()) == 1


def test_an_untyped_torchscript_graph_gets_a_latent_cache(optimum_folder, tmp_path):
    """optimum's own export keeps no value_info and ONNX shape inference stops early on it: values get symbolic
    shapes (infer_missing_shapes) but no element type, and the passes' new values, which copy a neighbour's
    dtype, could not be serialized ("'NoneType' object has no attribute 'value'"). infer_dtypes types them
    before the graph stage; the same plan then rewrites the untyped graph."""
    from qsvd_export.onnx_io import load_onnx
    from qsvd_export.passes.canonical_attention import canonicalize_attention
    from qsvd_export.passes.chain import run_graph_stage

    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(1).integers(0, 256, (4, 16)))
    out = tmp_path / "kv50"
    assert main([str(optimum_folder / "model.onnx"), "--budget", "kv=0.5", "--calib-npz", str(tmp_path / "calib.npz"),
                 "--grad-windows", "2", "-o", str(out), "-q"]) == 0
    model = load_onnx(optimum_folder / "model.onnx")
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value not in outputs and value.shape is not None:
                value.type = None  # what the real optimum graph looks like after loading
    canonicalize_attention(model)
    context = run_graph_stage(model, load_plan(out))  # serializes the graph (check_model) at the end
    assert [layer.cache for _, layer in sorted(context.layers.items())] == ["latent", "latent"]


OPTIMUM_LLAMA = Path(__file__).parent / "fixtures" / "optimum_llama"  # written by optimum-onnx 0.1.0 (SOURCE.md)


def test_the_graph_optimum_wrote_compiles_for_npu(tmp_path):
    """optimum-onnx 0.1.0's own graph (transformers 4.57): the rotary ``inv_freq`` Expand reads a shape that
    only folds once its ConstantOfShape folds, layer 1's mask reads the shape of layer 0's query, and RMSNorm's
    rsqrt is ``Div(1, Sqrt)``. With these handled, cos/sin become tables, every layer gets the float mask and
    every norm is fused (unfused, smollm2's mean of squares overflowed the 16-bit range: 3% argmax agreement
    on HTP); the static graphs then compile
    whole on QNN HTP with CPU fallback disabled (when onnxruntime-qnn is installed; --strict checks the op set
    either way). Before: QNN finalize failed with MEM_ALLOC on ``/model/rotary_emb/MatMul``."""
    import shutil

    folder = tmp_path / "optimum"
    shutil.copytree(OPTIMUM_LLAMA, folder)
    out = tmp_path / "npu"
    assert main([str(folder / "model.onnx"), "--target", "npu", "--context-length", "48", "--prefill-length", "8",
                 "--strict", "-o", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    for role in ("prefill", "decode"):
        graph = report["target"]["graphs"][role]
        assert len(graph["rotary_tables"]) == 2 and "skipped" not in graph, graph
        assert graph["rms_norms_fused"] == 5, graph  # 2 layers x 2 + the final norm
    import onnx

    ops = {n.op_type for name in ("prefill", "decode") for n in onnx.load(str(out / f"{name}.onnx"),
                                                                          load_external_data=False).graph.node}
    assert not ops & {"IsNaN", "Where", "And", "Cos", "Sin"}, ops
    check = report["target"].get("verification") or {}
    if check and not check["qnn"].startswith("skipped"):
        assert check["qnn"] == "compiled" and check["nodes_on_cpu"] == 0 and check["tokens_match"], check


def test_the_graph_optimum_wrote_gets_a_plan_equal_to_torch(tmp_path):
    """The same optimum graph, graph-only kv=0.5: every block gets a latent cache and the bundle equals torch
    with the plan applied (the fixture's weights are build_tiny('llama')'s)."""
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(1).integers(0, 256, (4, 16)))
    out = tmp_path / "kv50"
    assert main([str(OPTIMUM_LLAMA / "model.onnx"), "--budget", "kv=0.5", "--calib-npz", str(tmp_path / "calib.npz"),
                 "--grad-windows", "2", "-o", str(out), "-q"]) == 0
    bundle = json.loads((out / "qsvd_config.json").read_text())
    assert all(layer["kind"] == "latent" for layer in bundle["cache"])
    assert_decoder_parity(out, apply_plan(build_tiny("llama").model, load_plan(out)),
                          np.random.default_rng(4).integers(0, 256, (1, 9)), next_token=7)


def test_npu_names_a_missing_kv_cache(tmp_path, capsys):
    """A decoder exported without its cache (input_ids, attention_mask → logits) cannot become static prefill/decode
    graphs over a cache: the refusal says so, instead of a static-shapes failure."""
    from qsvd_export.tiny import _vlm_tokenizer

    graph = tmp_path / "dynamo" / "model.onnx"
    _export("llama", "legacy", graph)
    _vlm_tokenizer().save_pretrained(tmp_path / "hf")
    build_tiny("llama").model.config.save_pretrained(tmp_path / "hf")
    assert main([str(graph), "--target", "npu", "--tokenizer", str(tmp_path / "hf"), "-o", str(tmp_path / "out"),
                 "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "without KV cache inputs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
