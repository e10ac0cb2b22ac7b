"""genai_config.json: written from the bundle's cache description, run by onnxruntime-genai, or refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsvd_export.bundle import CONFIG_NAME, BundleConfig, CacheTensor, GraphSpec, LayerCache, load_bundle_config
from qsvd_export.genai_config import GENAI_CONFIG, decide, write_genai_config
from qsvd_export.runtimes.decode import DecoderRunner

og = pytest.importorskip("onnxruntime_genai")  # in the test extra (constraints.txt pins it)

PROMPT = [5, 17, 42, 9, 100, 3]


def genai_tokens(bundle: Path, prompt: list[int], new: int, chunk: int | None = None) -> list[int]:
    """genai's greedy tokens; ``chunk``: its ``search.chunk_size`` overridden (as an app would, by a config overlay)."""
    config = og.Config(str(bundle))
    if chunk is not None:
        config.overlay(json.dumps({"search": {"chunk_size": chunk}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def genai_input_ids(bundle: Path, prompt: list[int], new: int, chunk: int) -> list[list[int]]:
    """The ``input_ids`` of every forward genai runs (read from its model-input log) for the prompt and ``new``
    tokens with ``search.chunk_size`` = ``chunk``."""
    import re

    logs: list[str] = []
    og.set_log_callback(logs.append)
    og.set_log_options(enabled=True, model_input_values=True)
    try:
        genai_tokens(bundle, prompt, new, chunk)
    finally:
        og.set_log_options(enabled=False, model_input_values=False)
        og.set_log_callback(None)
    text = re.sub(r"\x1b\[[0-9;]*m", "", "".join(logs))  # the log is coloured
    feeds = re.findall(r"Name: input_ids .*?\nValues\[ ([\d ]+) \]", text)
    return [[int(v) for v in values.split()] for values in feeds]


def runner_tokens(bundle: Path, prompt: list[int], new: int) -> list[int]:
    return DecoderRunner(bundle).generate(prompt, new, load_bundle_config(bundle).generation.get("eos_token_ids"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_bundle_runs_in_genai_with_the_runners_tokens(bundles, family):
    bundle = bundles.dense(family)
    report = json.loads((bundle / "report.json").read_text())
    assert report["runtimes"]["onnxruntime_genai"]["runs"] is True
    assert (bundle / GENAI_CONFIG).is_file() and "onnxruntime-genai" in (bundle / "README.md").read_text()
    ours = runner_tokens(bundle, PROMPT, 12)
    assert len(ours) > 1
    assert genai_tokens(bundle, PROMPT, 12) == ours


def test_cpu_w4a8_bundle_with_group_query_attention_runs_in_genai(tmp_path):
    from qsvd_export import ExportOptions, export_model

    result = export_model("tiny-llama", tmp_path / "w4a8", ExportOptions(target="cpu", bits="w4a8"))
    assert result.report["target"]["attention"]["group_query_attention"] > 0  # the fused form genai must run
    assert load_bundle_config(result.out).prefill_chunk is None  # fused: the whole prompt in one forward
    assert "prefill_chunk" not in (result.out / CONFIG_NAME).read_text()
    assert "tokens per call" not in (result.out / "README.md").read_text()
    assert "chunk_size" not in json.loads((result.out / GENAI_CONFIG).read_text())["search"]
    assert genai_tokens(result.out, PROMPT, 12) == runner_tokens(result.out, PROMPT, 12)


def _config(cache: list[LayerCache], **extra) -> BundleConfig:
    names = [t.input for layer in cache for t in layer.tensors]
    return BundleConfig("m", "llama", "decoder", [GraphSpec("model", "model.onnx", ["input_ids", *names], ["logits"])],
                        cache, {"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 32}, **extra)


def _kv(layer: int, heads: int, size: int, dtype: str = "float32") -> LayerCache:
    return LayerCache(layer, "dense", [
        CacheTensor(f"past_key_values.{layer}.{part}", f"present.{layer}.{part}",
                    ["batch_size", heads, "past_sequence_length", size], dtype, 2) for part in ("key", "value")])


def _latent(layer: int, rank: int, sink: bool = False, dtype: str = "float32") -> LayerCache:
    parts = ["latent", "latent_sink"] if sink else ["latent"]
    return LayerCache(layer, "latent", [CacheTensor(f"past_key_values.{layer}.{part}", f"present.{layer}.{part}",
                                                    ["batch_size", "past_sequence_length", rank], dtype, 1)
                                        for part in parts], rank)


@pytest.mark.parametrize("cache, extra, fragment", [
    ([_latent(0, 24, sink=True), _latent(1, 16, sink=True)], {}, "the 4-bit latent's float32 sink"),
    ([_latent(0, 24, dtype="uint16")], {}, "genai allocates"),
    ([_kv(0, 2, 8), _kv(1, 2, 8, "float16")], {}, "mix dtypes"),
    ([_kv(0, 2, 8, "uint16"), _kv(1, 2, 8, "uint16")], {}, "is not one genai allocates"),
    ([_kv(0, 2, 8)], {"static_shapes": {"context_length": 64, "prefill_length": 16}}, "windowed_kv_cache.cpp"),
    ([_kv(1, 2, 8)], {}, "are not 0..0"),
])
def test_layouts_genai_cannot_bind_are_refused_with_the_reason(tmp_path, cache, extra, fragment):
    config = _config(cache, **extra)
    entry = write_genai_config(tmp_path, config)
    assert entry["runs"] is False and fragment in entry["reason"]
    assert not (tmp_path / GENAI_CONFIG).exists()


def test_encoder_and_vlm_bundles_are_refused(tmp_path):
    for kind in ("encoder", "vlm"):
        config = BundleConfig("m", "idefics3", kind, [GraphSpec("model", "model.onnx", [], [])])
        assert decide(config).config is None and decide(config).reason


def test_key_value_caches_take_their_shape_from_the_cache_not_the_model():
    """A latent presented as key/value caches (G groups as heads, rank as head size, int8) gets G and r."""
    config = _config([_kv(i, 3, 40, "int8") for i in range(2)])
    written = decide(config, "gpu").config
    assert written is not None
    decoder = written["model"]["decoder"]
    assert (decoder["num_key_value_heads"], decoder["head_size"], decoder["num_hidden_layers"]) == (3, 40, 2)
    assert decoder["session_options"]["provider_options"] == [{"cuda": {}}]


def _per_layer_graph(folder: Path, shapes: list[tuple[int, int]], vocab: int = 32) -> None:
    """A decoder graph whose layers cache [batch, h_i, len, d_i] (differing per layer). Its next token is
    (last id + cached length of every layer summed) mod vocab, so a cache genai failed to grow or feed back
    changes the tokens."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inputs, outputs = [], [], []
    inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_length"]))
    nodes.append(helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.INT64, [1], [2])))
    nodes.append(helper.make_node("Shape", ["input_ids"], ["ids_shape"]))
    lengths = []
    for i, (heads, size) in enumerate(shapes):
        for part in ("key", "value"):
            past = f"past_key_values.{i}.{part}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch_size", heads, "past", size]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT,
                                                         ["batch_size", heads, "total", size]))
            nodes.append(helper.make_node("Constant", [], [f"new_shape_{i}_{part}"], value=helper.make_tensor(
                "s", TensorProto.INT64, [4], [1, heads, 1, size])))
            nodes.append(helper.make_node("Slice", ["ids_shape", "one_index", "two_index"], [f"seq_{i}_{part}"]))
            nodes.append(helper.make_node("ScatterElements", [f"new_shape_{i}_{part}", "two", f"seq_{i}_{part}"],
                                          [f"shape_{i}_{part}"], axis=0))
            nodes.append(helper.make_node("ConstantOfShape", [f"shape_{i}_{part}"], [f"new_{i}_{part}"],
                                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])))
            nodes.append(helper.make_node("Concat", [past, f"new_{i}_{part}"], [f"present.{i}.{part}"], axis=2))
        nodes.append(helper.make_node("Shape", [f"past_key_values.{i}.value"], [f"past_len_{i}"], start=2, end=3))
        lengths.append(f"past_len_{i}")
    nodes = [helper.make_node("Constant", [], ["one_index"], value=helper.make_tensor("o", TensorProto.INT64, [1], [1])),
             helper.make_node("Constant", [], ["two_index"], value=helper.make_tensor("t", TensorProto.INT64, [1], [2])),
             *nodes]
    total = lengths[0]
    for i, name in enumerate(lengths[1:]):  # Sum has no int64 kernel
        nodes.append(helper.make_node("Add", [total, name], [f"cached_{i}"]))
        total = f"cached_{i}"
    nodes.append(helper.make_node("Identity", [total], ["cached"]))
    nodes.append(helper.make_node("Add", ["input_ids", "cached"], ["shifted"]))
    nodes.append(helper.make_node("Constant", [], ["vocab"], value=helper.make_tensor("v", TensorProto.INT64, [], [vocab])))
    nodes.append(helper.make_node("Mod", ["shifted", "vocab"], ["next"]))
    nodes.append(helper.make_node("Constant", [], ["depth"], value=helper.make_tensor("d", TensorProto.INT64, [], [vocab])))
    nodes.append(helper.make_node("Constant", [], ["off_on"], value=helper.make_tensor("oo", TensorProto.FLOAT, [2], [0, 1])))
    nodes.append(helper.make_node("OneHot", ["next", "depth", "off_on"], ["logits"], axis=-1))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]))
    graph = helper.make_graph(nodes, "per_layer", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
              str(folder / "model.onnx"))


def test_per_layer_head_sizes_run_in_genai(tmp_path):
    """genai 0.18 binds caches whose heads and head size differ by layer (QSVD ranks vary by layer)."""
    import onnx_ir as ir

    from qsvd_export.export import cache_layout_from_graph

    shapes = [(3, 24), (1, 40), (2, 8)]
    _per_layer_graph(tmp_path, shapes)
    model = ir.load(tmp_path / "model.onnx")
    config = BundleConfig("synthetic", "llama", "decoder",
                          [GraphSpec("model", "model.onnx", [v.name for v in model.graph.inputs],
                                     [v.name for v in model.graph.outputs])],
                          cache_layout_from_graph(model), {"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 32,
                                                           "context_length": 64}, {"eos_token_ids": [31]})
    (tmp_path / CONFIG_NAME).write_text(config.to_json())
    assert write_genai_config(tmp_path, config)["runs"] is True
    prompt = [1, 2, 3]
    ours = DecoderRunner(tmp_path).generate(prompt, 6)
    # prefill: 3 + 0 = 3; then each step adds the cached length of 3 layers: 3 + 3*3, 12 + 3*4, ...
    expected, token, length = [], 3, 3
    for _ in range(6):
        expected.append(token)
        token, length = (token + len(shapes) * length) % 32, length + 1
    assert ours == expected
    assert genai_tokens(tmp_path, prompt, 6) == ours


def test_hf_config_files_load_in_transformers(bundles):
    from transformers import AutoConfig, GenerationConfig

    bundle = bundles.dense("llama")
    config = AutoConfig.from_pretrained(bundle)
    assert config.num_hidden_layers == len(load_bundle_config(bundle).cache)
    assert GenerationConfig.from_pretrained(bundle).do_sample is False
    assert "quantization_config" not in json.loads((bundle / "config.json").read_text())


def test_genai_chat_sample_on_a_tiny_bundle(bundles, tmp_path):
    import subprocess
    import sys

    sample = Path(__file__).resolve().parents[1] / "samples" / "genai_chat.py"
    bundle = bundles.dense("llama")
    run = subprocess.run([sys.executable, str(sample), str(bundle), "--ids", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", "10"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["new_ids"] == runner_tokens(bundle, PROMPT, 10)

    refused = tmp_path / "npu-like"
    refused.mkdir()
    (refused / "report.json").write_text(json.dumps({"runtimes": {"onnxruntime_genai": {"runs": False,
                                                                                        "reason": "static graphs"}}}))
    run = subprocess.run([sys.executable, str(sample), str(refused), "--ids", "1"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.strip() == (f"genai_chat: error: {refused} has no genai_config.json: "
                                                          "static graphs")


def _session_outputs(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _latent_feeds(config: BundleConfig, ids: list[int], past: dict) -> dict:
    import numpy as np

    total = len(ids) + next(iter(past.values())).shape[1]
    return {"input_ids": np.asarray([ids]), "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(total - len(ids), total)[None, :], **past}


def test_latent_bundles_run_in_genai_through_a_key_value_view(tmp_path):
    """kv=0.5 bundles (fp32 latent, and the cpu target's uint8 codes) run in genai through model.genai.onnx: the
    same logits and latents as model.onnx in ONNX Runtime, the runner's tokens in genai; the 4-bit latent (a
    second, sink tensor per layer) is refused with the reason."""
    import numpy as np

    from qsvd_export import CompressionOptions, compress_model
    from qsvd_export.cli import main
    from qsvd_export.genai_latent import GENAI_GRAPH

    result = compress_model("tiny-llama", tmp_path / "kv50", CompressionOptions(
        budget="kv=0.5", calib_windows=4, calib_length=32, grad_windows=1))
    cpu = tmp_path / "kv50-cpu"
    assert main([str(result.out / "model.onnx"), "--target", "cpu", "-o", str(cpu), "-q"]) == 0
    for bundle in (result.out, cpu):
        config = load_bundle_config(bundle)
        assert all(layer.kind == "latent" for layer in config.cache)
        entry = json.loads((bundle / "report.json").read_text())["runtimes"]["onnxruntime_genai"]
        assert entry["runs"] is True and entry["graph"] == GENAI_GRAPH and (bundle / GENAI_GRAPH).is_file()
        odd = sum(1 for layer in config.cache if layer.tensors[0].shape[2] % 2)
        assert entry["padding_bytes_per_token"] == odd * (4 if config.cache[0].tensors[0].dtype == "float32" else 1)
        # prefill then one decode step, each latent split into halves for the genai graph
        dtype = np.dtype(config.cache[0].tensors[0].dtype)
        past = {t.input: np.zeros((1, 0, t.shape[2]), dtype) for layer in config.cache for t in layer.tensors}
        ids = PROMPT
        for _ in range(2):
            feeds = _latent_feeds(config, ids, past)
            halves = {}
            for name, latent in past.items():
                layer, half = name.split(".")[1], (latent.shape[2] + 1) // 2
                padded = np.concatenate([latent, np.zeros((1, latent.shape[1], 2 * half - latent.shape[2]), dtype)], 2)
                halves[f"past_key_values.{layer}.key"] = padded[:, None, :, :half]
                halves[f"past_key_values.{layer}.value"] = padded[:, None, :, half:]
            ours = _session_outputs(bundle / "model.onnx", feeds)
            shown = _session_outputs(bundle / GENAI_GRAPH, {**{k: v for k, v in feeds.items() if k not in past},
                                                            **halves})
            np.testing.assert_array_equal(shown["logits"], ours["logits"])
            for layer in config.cache:
                present = ours[layer.tensors[0].output]
                joined = np.concatenate([shown[f"present.{layer.layer}.key"], shown[f"present.{layer.layer}.value"]], 3)
                np.testing.assert_array_equal(joined[:, 0, :, :present.shape[2]], present)
                assert not joined[:, 0, :, present.shape[2]:].any()  # the odd rank's padding channel stays zero
            past = {layer.tensors[0].input: ours[layer.tensors[0].output] for layer in config.cache}
            ids = [int(ours["logits"][0, -1].argmax())]
        assert genai_tokens(bundle, PROMPT, 12) == runner_tokens(bundle, PROMPT, 12)
        # unfused attention: genai feeds long prompts through the cache in parts (search.chunk_size), as the runner
        assert config.prefill_chunk == 512 and "at most 512 tokens per call" in (bundle / "README.md").read_text()
        assert json.loads((bundle / GENAI_CONFIG).read_text())["search"]["chunk_size"] == 512
        feeds = genai_input_ids(bundle, PROMPT, 3, chunk=4)
        assert feeds[:2] == [PROMPT[:4], PROMPT[4:]] and all(len(ids) == 1 for ids in feeds[2:])
        assert genai_tokens(bundle, PROMPT, 12, chunk=4) == runner_tokens(bundle, PROMPT, 12)
    four = tmp_path / "kv50-cpu4"
    assert main([str(result.out / "model.onnx"), "--target", "cpu", "--kv-bits", "4", "-o", str(four), "-q"]) == 0
    entry = json.loads((four / "report.json").read_text())["runtimes"]["onnxruntime_genai"]
    assert entry["runs"] is False and "sink" in entry["reason"] and not (four / GENAI_CONFIG).exists()
    assert entry["reason"] in (four / "README.md").read_text() and not (four / GENAI_GRAPH).exists()


def test_tokenizer_config_is_portable_and_still_loads(tmp_path):
    """transformers 5's TokenizersBackend class and side-file chat template become a config 4.x and genai read."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    from qsvd_export.runtime_files import portable_tokenizer_config

    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "eos_token": "<eos>", "unk_token": "<unk>",
        "extra_special_tokens": ["<eos>"]}))
    assert portable_tokenizer_config(tmp_path) is True
    data = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert data["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in data
    assert data["chat_template"].startswith("{% for m in messages %}")
    assert portable_tokenizer_config(tmp_path) is False  # idempotent
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("hello world", add_special_tokens=False)["input_ids"] == [2, 3]
    assert loaded.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello"
