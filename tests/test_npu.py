"""npu target: static prefill/decode graphs, HTP legalization, QDQ, and the QNN HTP session when installed."""

from __future__ import annotations

import collections
import importlib.util
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qsvd_export.cli import main
from qsvd_export.targets.npu.options import NpuOptions
from qsvd_export.targets.npu.static_graphs import static_float_graphs
from qsvd_export.passes.npu_legalize import npu_violations
from qsvd_export.runtimes.decode import DecoderRunner
from qsvd_export.errors import UsageError
from qsvd_export.runtimes.static_decode import StaticDecoder

from conftest import DECODER_FAMILIES

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
SMALL = ["--context-length", "48", "--prefill-length", "8"]


def _static_float(bundle, tmp_path, prefill=8, context=48):
    from qsvd_export.bundle import load_bundle_config

    config = load_bundle_config(bundle)
    options = NpuOptions(prefill_length=prefill, context_length=context)
    paths, report = static_float_graphs(bundle / "model.onnx", tmp_path, options)
    return config, paths, report, StaticDecoder.from_files(paths["prefill"], paths["decode"], config.cache,
                                                           context, prefill)


def _assert_static_matches_dynamic(bundle, static):
    """Chunked prefill (a left-padded chunk, then a full one) and decode steps = the dynamic graph's logits."""
    dynamic = DecoderRunner(bundle)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 13)]  # 5 padded + 8 tokens
    reference, cache = dynamic.prefill(np.asarray([prompt]))
    logits, state = static.prefill(prompt)
    assert np.abs(logits - reference[0, -1]).max() < 1e-4
    length = len(prompt)
    for token in (7, 99, 42):
        reference, cache = dynamic.step(np.asarray([[token]]), np.ones((1, length + 1)), np.asarray([[length]]), cache)
        step_logits, state = static.step(state, [token])
        assert np.abs(step_logits[-1] - reference[0, -1]).max() < 1e-4
        length += 1
    assert state.next_position == length and int(state.mask.sum()) == length


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_static_graphs_reproduce_the_dynamic_graph(family, bundles, tmp_path):
    bundle = bundles.dense(family)
    _, _, _, static = _static_float(bundle, tmp_path)
    _assert_static_matches_dynamic(bundle, static)


def test_latent_static_graphs_gather_rotary_tables_for_every_cache_slot(tmp_path, capsys):
    """A latent graph re-rotates rebuilt keys at the positions of all cache slots (derived from the mask):
    those cos/sin become table Gathers too, shared with the new tokens' ones, and the logits still match."""
    bundle = tmp_path / "latent"
    code = main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(bundle), "--calib-windows", "4",
                 "--calib-length", "64", "--grad-windows", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    _, paths, report, static = _static_float(bundle, tmp_path)
    for role, path in paths.items():
        ops = collections.Counter(n.op_type for n in ir.load(path).graph)
        assert ops["Cos"] == ops["Sin"] == 0 and "skipped" not in report[role], report[role]
        assert len(report[role]["rotary_tables"]) == 2  # one cos and one sin table for both position sources
    _assert_static_matches_dynamic(bundle, static)


def test_static_windows_longer_than_a_prefill_chunk_score_like_the_dynamic_graph(bundles, tmp_path):
    """A 24-token window = 3 prefill chunks through the cache: the same NLL as one dynamic prefill."""
    bundle = bundles.dense("llama")
    _, _, _, static = _static_float(bundle, tmp_path)
    windows = np.random.default_rng(1).integers(0, 256, (2, 24))
    expected = DecoderRunner(bundle).window_nlls(windows)
    assert np.allclose(static.window_nlls(windows), expected, atol=1e-5)
    with pytest.raises(UsageError, match="multiple of 8"):
        static.window_nlls(windows[:, :20])
    with pytest.raises(UsageError, match="at most 48"):
        static.window_nlls(np.zeros((1, 56), dtype=np.int64))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_static_graphs_hold_only_htp_ops(family, bundles, tmp_path):
    _, paths, report, _ = _static_float(bundles.dense(family), tmp_path)
    for role, path in paths.items():
        model = ir.load(path)
        assert npu_violations(model) == [], role
        ops = collections.Counter(n.op_type for n in model.graph)
        assert "Where" not in ops and "ReduceMean" not in ops  # bool mask gone, RMSNorm / LayerNorm fused
        assert report[role]["mask_constants_clamped"] >= 1
        rotary = family != "gpt2"  # gpt2 has learned positions; the others rotary cos/sin, now gathered
        assert ops["Cos"] == ops["Sin"] == 0
        assert bool(report[role]["rotary_tables"]) is rotary, report[role]


def test_violations_name_the_nodes(bundles):
    problems = npu_violations(ir.load(bundles.dense("llama") / "model.onnx"))
    assert any(p.startswith("input input_ids: dynamic shape") for p in problems)
    assert any("Range" in p and "not run by QNN HTP" in p for p in problems)


def _qdq_ops(path):
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def test_export_target_npu_writes_qdq_prefill_and_decode(tmp_path, capsys):
    out = tmp_path / "npu"
    code = main(["export", "tiny-llama", "-o", str(out), "--target", "npu", *SMALL, "-q"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "qsvd_config.json").read_text())
    assert [g["role"] for g in config["graphs"]] == ["prefill", "decode"]
    assert config["static_shapes"] == {"context_length": 48, "prefill_length": 8, "cache": "right-aligned",
                                     "htp_arch": "73"}
    assert not (out / "model.onnx").exists()
    report = json.loads((out / "report.json").read_text())["target"]
    assert report["bits"] == "w8a16"
    # both graphs read their quantized weights from one file, each weight stored once
    assert report["weights"]["weight_file"] == "weights.data" and report["weights"]["bytes_shared"] > 0
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".data") == ["weights.data"]
    for role in ("prefill", "decode"):
        ops = _qdq_ops(out / f"{role}.onnx")
        assert ops["QuantizeLinear"] > 20 and ops["SimplifiedLayerNormalization"] == 5
        assert report["graphs"][role]["htp_violations"] == []
        # every projection weight is int8 with one scale per output channel
        proto = onnx.load(out / f"{role}.onnx", load_external_data=False)
        weights = {i.name: i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
        per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                       and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
        assert len(per_channel) == 2 * 7  # q k v o gate up down in each of the 2 layers
        # rotary cos/sin tables [context, head_dim] are 16-bit, like the activations they replace
        tables = [i for i in proto.graph.initializer if i.name.endswith("rotary_table_quantized")]
        assert tables and {i.data_type for i in tables} == {onnx.TensorProto.UINT16}
        assert all(i.dims[0] == 48 for i in tables)
    check = report["verification"]
    if HAS_QNN:  # random tiny weights give near-tied logits: compare logits, not greedy tokens
        assert check["qnn"] == "compiled" and check["cpu_fallback"] == "disabled"
        assert check["argmax_agreement"] >= 0.9 and check["max_abs_logit_diff"] < 0.05, check
    else:
        assert check["qnn"].startswith("skipped: onnxruntime-qnn is not installed")
    placement = json.loads((out / "report.json").read_text())["summary"]["ep_nodes"]
    if HAS_QNN:  # placement as onnxruntime assigned it (not the graph's node count), and the report shows it
        assert placement["checked_on"].startswith("QNNExecutionProvider (HTP v73")
        assert placement["source"] == check["placement_source"] == "onnxruntime get_provider_graph_assignment_info"
        assert placement["graphs"] == check["placement"] and check["nodes_on_cpu"] == 0
        for role in ("prefill", "decode"):
            assert set(placement["graphs"][role]) == {"QNNExecutionProvider"}, placement
            assert placement["graphs"][role]["QNNExecutionProvider"] > 0
        assert "get_provider_graph_assignment_info" in (out / "report.md").read_text()
    else:
        assert placement["checked_on"] is None and "skipped" in placement["note"]
    readme = (out / "README.md").read_text()
    assert "prefill.onnx" in readme and "[1, 48]" in readme and "past_key_values.{i}.key" in readme
    # the static bundle drives `run` and `eval` like any bundle
    assert main(["run", str(out), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert main(["eval", str(out), "--ppl", "wiki_eval", "--windows", "2", "--window-len", "8"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed (pip install 'qsvd-export[npu]')")
def test_latent_bundle_compiles_whole_on_qnn_htp(tmp_path, capsys):
    out = tmp_path / "latent-npu"
    code = main(["compress", "tiny-qwen2", "--budget", "kv=0.5", "-o", str(out), "--calib-windows", "4",
                 "--calib-length", "64", "--grad-windows", "2", "--target", "npu", "--bits", "w8a8", *SMALL, "-q"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "qsvd_config.json").read_text())
    assert {layer["kind"] for layer in config["cache"]} == {"latent"}
    report = json.loads((out / "report.json").read_text())["target"]
    assert all(graph["htp_violations"] == [] for graph in report["graphs"].values())  # incl. the CumSum positions
    check = report["verification"]
    assert check["qnn"] == "compiled" and check["max_abs_logit_diff"] < 0.5, check  # w8a8: 8-bit rounding differs


def test_npu_on_a_bare_onnx_file_asks_for_its_tokenizer(tmp_path, bundles, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (bare / name).write_bytes((bundles.dense("llama") / name).read_bytes())
    out = tmp_path / "out"
    code = main([str(bare / "model.onnx"), "-o", str(out), "--target", "npu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs the graph's bundle" in err and not out.exists()


def test_npu_refuses_an_encoder(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "tiny-bert", "-o", str(out), "--target", "npu", *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 4 and "static decoder graphs" in err and not out.exists()


def test_npu_bundles_are_byte_identical_across_runs(tmp_path, bundles, capsys):
    outs = [tmp_path / f"run{i}" for i in range(2)]
    for out in outs:
        code = main([str(bundles.dense("llama") / "model.onnx"), "--target", "npu", *SMALL, "--no-verify",
                     "-o", str(out), "-q"])
        assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in outs[0].iterdir() if p.name != "timings.json")
    assert names == sorted(p.name for p in outs[1].iterdir() if p.name != "timings.json")
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed (pip install 'qsvd-export[npu]')")
def test_precompiled_context_binaries_load_and_match_the_cpu_ep(tmp_path, bundles, capsys):
    out = tmp_path / "ctx"
    code = main([str(bundles.dense("llama") / "model.onnx"), "--target", "npu", *SMALL, "--precompile",
                 "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    contexts = json.loads((out / "qsvd_config.json").read_text())["static_shapes"]["qnn_context_models"]
    assert contexts == {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}
    for name in contexts.values():
        ops = _qdq_ops(out / name)
        assert set(ops) == {"EPContext"}  # the whole graph is one compiled HTP node
        assert (out / name.replace(".onnx", "_qnn.bin")).is_file()
    check = json.loads((out / "report.json").read_text())["target"]["verification"]
    assert check["qnn"] == "loaded from context binaries" and check["max_abs_logit_diff"] < 0.05, check
    assert main(["run", str(out), "--prompt", "hi", "--max-new-tokens", "2", "--target", "npu"]) == 0


def test_precompile_without_the_qnn_package_names_the_fix(monkeypatch, tmp_path, bundles, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_qnn" else real(name, *a))
    out = tmp_path / "out"
    code = main([str(bundles.dense("llama") / "model.onnx"), "--target", "npu", *SMALL, "--precompile",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 5 and "pip install 'qsvd-export[npu]'" in err and not out.exists()


def test_w8a8_puts_8_bits_on_the_projections_that_read_the_norm_except_up_proj(tmp_path, bundles, capsys):
    out = tmp_path / "w8a8"
    code = main([str(bundles.dense("llama") / "model.onnx"), "--target", "npu", "--bits", "w8a8", *SMALL,
                 "--no-verify", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    proto = onnx.load(out / "prefill.onnx", load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    q_type = {n.input[0]: inits[n.input[2]].data_type for n in proto.graph.node
              if n.op_type == "QuantizeLinear" and n.input[2] in inits}
    consumers = collections.defaultdict(list)
    for n in proto.graph.node:
        for name in n.input:
            consumers[name].append(n)
    widths = {}
    for n in proto.graph.node:
        if n.op_type == "MatMul" and n.input[1].endswith("_DequantizeLinear_Output"):
            weight = n.input[1].removesuffix("_DequantizeLinear_Output") + "_quantized"
            if weight in inits and inits[weight].data_type == onnx.TensorProto.INT8:
                widths[n.output[0]] = list(inits[weight].dims)
    eight = {t for t, (k, n) in widths.items() if q_type.get(t) == onnx.TensorProto.UINT8}
    sixteen = {t for t, (k, n) in widths.items() if q_type.get(t) == onnx.TensorProto.UINT16}
    # per layer: q, k, v, gate at 8 bits; up, o, down at 16
    assert len(eight) == 2 * 4 and len(sixteen) == 2 * 3
    assert {tuple(widths[t]) for t in eight} == {(64, 64), (64, 32), (64, 128)}


def test_decisive_agreement_ignores_near_ties_and_counts_decisive_flips():
    from qsvd_export.targets.npu.verify import decisive_agreement

    reference = np.asarray([[5.0, 1.0, 0.0], [2.0, 1.8, 0.0], [0.0, 3.0, 1.0]])
    tie_flip = np.asarray([[5.0, 1.0, 0.0], [1.8, 2.0, 0.0], [0.0, 3.0, 1.0]])  # row 1 leads by 0.2 only
    assert decisive_agreement(tie_flip, reference) == {"decisive_positions": 2, "decisive_argmax_agreement": 1.0}
    real_flip = np.asarray([[0.0, 6.0, 0.0], [2.0, 1.8, 0.0], [0.0, 3.0, 1.0]])
    assert decisive_agreement(real_flip, reference)["decisive_argmax_agreement"] == 0.5


def test_decisive_agreement_is_undefined_without_decisive_positions():
    """All near-ties: no evidence, so no rate (not 100%), and every printed form says undefined."""
    from qsvd_export.targets.npu.verify import decisive_agreement, decisive_text

    reference = np.asarray([[2.0, 1.8, 0.0], [0.0, 3.0, 2.5]])
    flipped = np.asarray([[1.8, 2.0, 0.0], [0.0, 2.5, 3.0]])  # every argmax differs
    result = decisive_agreement(flipped, reference)
    assert result["decisive_positions"] == 0 and result["decisive_argmax_agreement"] is None
    assert result["decisive_note"].startswith("undefined")
    assert decisive_text(result).startswith("undefined") and "100" not in decisive_text(result)
    decisive = np.asarray([[5.0, 1.0, 0.0]])
    assert decisive_text(decisive_agreement(decisive, decisive)).startswith("100.0% at the 1 positions")


class _Subgraph:
    def __init__(self, ep: str, nodes: int) -> None:
        self.ep_name, self._nodes = ep, nodes

    def get_nodes(self) -> list[int]:
        return list(range(self._nodes))


class _Session:
    def __init__(self, subgraphs: list[_Subgraph] | None) -> None:
        if subgraphs is not None:
            self.get_provider_graph_assignment_info = lambda: subgraphs


def test_qnn_placement_is_read_from_the_ep_or_says_it_is_inferred():
    from qsvd_export.targets.npu.verify import qnn_placement

    sessions = {"prefill": _Session([_Subgraph("QNNExecutionProvider", 5), _Subgraph("CPUExecutionProvider", 2)]),
                "decode": _Session([_Subgraph("QNNExecutionProvider", 4)])}
    read = qnn_placement(sessions, {"prefill": 99, "decode": 99})
    assert read["placement"] == {"prefill": {"CPUExecutionProvider": 2, "QNNExecutionProvider": 5},
                                 "decode": {"QNNExecutionProvider": 4}}
    assert read["nodes_on_cpu"] == 2 and read["placement_source"].startswith("onnxruntime")
    inferred = qnn_placement({"prefill": _Session(None), "decode": _Session(None)}, {"prefill": 7, "decode": 3})
    assert inferred["placement"] == {"prefill": {"QNNExecutionProvider": 7}, "decode": {"QNNExecutionProvider": 3}}
    assert inferred["nodes_on_cpu"] is None and "inferred" in inferred["placement_source"]
    assert "CPU fallback disabled" in inferred["placement_source"]


@pytest.mark.parametrize("bits", ["w4a16", "w4a8"])
def test_int4_presets_put_weights_in_lpbq_blocks_that_compile_whole_on_qnn(bits, tmp_path, bundles, capsys):
    """Every projection's int4 weight is blockwise (4-bit block codes × a channel scale); HTP takes the graphs
    with CPU fallback disabled and agrees with the CPU EP."""
    out = tmp_path / bits
    code = main([str(bundles.dense("llama") / "model.onnx"), "--target", "npu", "--bits", bits,
                 "--int4-block", "32", *SMALL, "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["target"]
    for role in ("prefill", "decode"):
        assert report["graphs"][role]["weight_blocks"] == {"lpbq_matmuls": 2 * 7, "per_channel_int4_matmuls": 0}
        assert report["graphs"][role]["htp_violations"] == []
        proto = onnx.load(out / f"{role}.onnx", load_external_data=False)
        blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
        assert len(blocked) == 2 * 7
    check = report["verification"]
    if HAS_QNN:
        assert check["qnn"] == "compiled" and check["max_abs_logit_diff"] < 0.05, check
    else:
        assert check["qnn"].startswith("skipped")


def test_int4_block_must_fit_htp(tmp_path, bundles, capsys):
    code = main([str(bundles.dense("llama") / "model.onnx"), "--target", "npu", "--bits", "w4a16",
                 "--int4-block", "20", *SMALL, "-o", str(tmp_path / "x"), "-q"])
    assert code == 2 and "--int4-block must be 0 (per channel) or a positive multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_int4_presets_keep_an_untied_lm_head_at_8_bits(tmp_path, capsys):
    out = tmp_path / "rotated-w4"  # --rotate unties the head: a plain 2-D weight writing the logits
    code = main(["export", "tiny-llama", "--rotate", "--target", "npu", "--bits", "w4a16", "--int4-block", "32",
                 *SMALL, "--no-verify", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    proto = onnx.load(out / "prefill.onnx", load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    weights = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear":
            source = producers[node.input[1]].input[0]
            if source in inits:
                weights[node.name] = inits[source].data_type
    assert list(weights.values()).count(onnx.TensorProto.INT8) == 1  # the head
    assert list(weights.values()).count(onnx.TensorProto.INT4) == 2 * 7


@pytest.mark.parametrize("bits, dtype", [(8, np.uint8), (16, np.uint16)])
def test_cache_io_in_integer_codes_with_one_static_scale(bits, dtype, tmp_path, capsys):
    """--kv-bits 8|16: the static graphs take and give their caches as codes (no float cache I/O), with the
    scale and zero point in qsvd_config.json, one per cache tensor, shared by prefill and decode. The runner
    moves codes between calls; the result stays close to the float-I/O bundle's on the CPU EP, and the graphs
    compile whole on QNN HTP."""
    outs = {}
    for kv in (32, bits):
        outs[kv] = tmp_path / f"kv{kv}"
        assert main(["export", "tiny-llama", "--target", "npu", "--kv-bits", str(kv), *SMALL, "-o", str(outs[kv]),
                     "-q"]) == 0, capsys.readouterr().err
    config = json.loads((outs[bits] / "qsvd_config.json").read_text())
    tensors = [t for layer in config["cache"] for t in layer["tensors"]]
    assert {t["dtype"] for t in tensors} == {np.dtype(dtype).name}
    assert all(t["quantization"]["scale"] > 0 and 0 <= t["quantization"]["zero_point"] <= np.iinfo(dtype).max
               for t in tensors)
    for role in ("prefill", "decode"):
        proto = onnx.load(outs[bits] / f"{role}.onnx", load_external_data=False)
        io = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
        expected = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        assert all(io[t["input"]] == expected and io[t["output"]] == expected for t in tensors), io
        # the graph reads the input's codes with the recorded pair
        reader = next(n for n in proto.graph.node if n.input and n.input[0] == tensors[0]["input"])
        scale = next(i for i in proto.graph.initializer if i.name == reader.input[1])
        assert reader.op_type == "DequantizeLinear"
        assert float(onnx.numpy_helper.to_array(scale)) == tensors[0]["quantization"]["scale"]
    float_json = json.loads((outs[32] / "qsvd_config.json").read_text())
    assert "quantization" not in float_json["cache"][0]["tensors"][0]  # float I/O bundles are unchanged
    report = json.loads((outs[bits] / "report.json").read_text())
    assert report["kv_bytes_per_token"] * 4 == json.loads((outs[32] / "report.json").read_text())["kv_bytes_per_token"] * (bits // 8)
    windows = np.random.default_rng(0).integers(0, 256, (2, 24))
    runners = {kv: StaticDecoder.from_bundle(outs[kv]) for kv in (bits, 32)}
    coded, plain = (np.mean(runners[kv].window_nlls(windows)) for kv in (bits, 32))
    assert abs(coded - plain) < 0.02 * plain, (coded, plain)
    steps, states = {}, {}
    for kv, runner in runners.items():  # decode steps after a prefill: the codes go round the decode graph
        logits, state = runner.prefill([int(t) for t in windows[0, :12]])
        steps[kv] = [logits]
        for token in windows[1, :4]:
            logits, state = runner.step(state, [int(token)])
            steps[kv].append(logits[-1])
        states[kv] = state
    assert states[bits].cache[tensors[0]["input"]].dtype == dtype and states[32].cache[tensors[0]["input"]].dtype == np.float32
    assert max(np.abs(a - b).max() for a, b in zip(steps[bits], steps[32])) < 0.05
    check = report["target"]["verification"]
    if HAS_QNN:
        assert check["qnn"] == "compiled" and check["nodes_on_cpu"] == 0 and check["argmax_agreement"] >= 0.9, check
