"""CLI: compress (torch stage + graph stage → bundle) and the graph stage on an existing ONNX file."""

from __future__ import annotations

import json

import numpy as np

from qsvd_export.bundle import load_bundle_config
from qsvd_export.cli import main
from qsvd_export.runtimes.decode import DecoderRunner

SMALL = ["--calib-windows", "4", "--calib-length", "64", "--grad-windows", "2", "-q"]


def test_compress_writes_a_latent_bundle_and_report(tmp_path, capsys):
    out = tmp_path / "kv50"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out), *SMALL]) == 0
    assert "2/2 layers with a latent cache" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["r2"] <= 0.5 and report["r1"] <= 1.0
    assert [layer["cache"] for layer in report["graph_stage"]["layers"]] == ["latent", "latent"]
    assert report["kv_bytes_per_token_fp16_graph"] == sum(2 * layer["latent_rank"] for layer in report["layers"])
    config = load_bundle_config(out)
    assert [layer.kind for layer in config.cache] == ["latent", "latent"]
    tokens = DecoderRunner(out).generate([1, 2, 3], max_new_tokens=4)
    assert len(tokens) == 4


def test_graph_stage_on_an_existing_onnx_file(tmp_path, bundles, capsys):
    plan_bundle = tmp_path / "planned"
    assert main(["compress", "tiny-qwen2", "--budget", "kv=0.5", "-o", str(plan_bundle), *SMALL]) == 0
    dense = bundles.dense("qwen2")
    out = tmp_path / "compiled"
    code = main([str(dense / "model.onnx"), "--plan", str(plan_bundle), "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert "2 with a latent cache" in capsys.readouterr().out
    ids = np.asarray([[5, 6, 7, 8]])
    a, _ = DecoderRunner(plan_bundle).prefill(ids)
    b, _ = DecoderRunner(out).prefill(ids)
    assert np.abs(a - b).max() <= 1e-5  # same plan, same graph stage, two entry points


def test_graph_stage_refuses_missing_and_broken_files(tmp_path, capsys):
    assert main([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]) == 3
    assert "no such ONNX file" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 not a protobuf")
    assert main([str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "out")]) == 3
    assert "not a valid ONNX file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_external_data_outside_the_folder_is_refused(tmp_path, bundles, capsys):
    import onnx

    proto = onnx.load(str(bundles.dense("llama") / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(proto, str(tmp_path / "evil.onnx"))
    assert main([str(tmp_path / "evil.onnx"), "-o", str(tmp_path / "out")]) == 3
    assert "escapes the model's folder" in capsys.readouterr().err


def test_invalid_compress_options_are_usage_errors(tmp_path, capsys):
    for extra in (["--budget", "kv=2"], ["--budget", "kv=0.5", "--bits", "w3a3"], ["--budget", "kv=0.5", "--beta", "2"]):
        assert main(["compress", "tiny-llama", "-o", str(tmp_path / "o"), *extra]) == 2
        assert capsys.readouterr().err.startswith("qsvd-export: error:")
    assert not (tmp_path / "o").exists()


def test_non_finite_weights_are_refused_by_name(tmp_path, bundles, capsys):
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(bundles.dense("llama") / "model.onnx"))
    target = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    data = numpy_helper.to_array(target).copy()
    data[0, 0] = np.nan
    target.CopyFrom(numpy_helper.from_array(data, target.name))
    onnx.save(proto, str(tmp_path / "nan.onnx"), save_as_external_data=True, location="nan.onnx.data")
    assert main([str(tmp_path / "nan.onnx"), "-o", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert f"weight '{target.name}' contains NaN" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_truncated_external_data_is_a_clean_error(tmp_path, bundles, capsys):
    import shutil

    shutil.copy(bundles.dense("llama") / "model.onnx", tmp_path / "model.onnx")
    data = (bundles.dense("llama") / "model.onnx.data").read_bytes()
    (tmp_path / "model.onnx.data").write_bytes(data[: len(data) // 2])
    assert main([str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert "cannot be read" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
