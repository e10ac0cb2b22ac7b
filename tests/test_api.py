"""The typed Python API: options raise the CLI's errors; export → load_bundle → streamed generation."""

from __future__ import annotations

import pytest

import qsvd_export
from qsvd_export import CompileOptions, CompressionOptions, ExportOptions, compile_graph, export_model, load_bundle
from qsvd_export.cli import main
from qsvd_export.errors import QsvdError, UsageError
from qsvd_export.runtimes.decode import DecoderRunner

# (options, the same choice on the command line)
CASES = [
    (lambda: ExportOptions(target="tpu"), ["export", "tiny-llama", "--target", "tpu"]),
    (lambda: ExportOptions(bits="w4a8"), ["export", "tiny-llama", "--bits", "w4a8"]),
    (lambda: ExportOptions(target="cpu", bits="w2a2"), ["export", "tiny-llama", "--target", "cpu", "--bits", "w2a2"]),
    (lambda: ExportOptions(smooth=True), ["export", "tiny-llama", "--smooth"]),
    (lambda: ExportOptions(rotate_mlp=True), ["export", "tiny-llama", "--rotate-mlp"]),
    (lambda: ExportOptions(precompile=True), ["export", "tiny-llama", "--precompile"]),
    (lambda: ExportOptions(target="npu", prefill_length=2048), ["export", "tiny-llama", "--target", "npu",
                                                                "--prefill-length", "2048"]),
    (lambda: ExportOptions(calibration_method="max"), ["export", "tiny-llama", "--calibration-method", "max"]),
    (lambda: CompressionOptions(budget="kv=2"), ["compress", "tiny-llama", "--budget", "kv=2"]),
    (lambda: CompressionOptions(budget="kv=0.5", calib_windows=0), ["compress", "tiny-llama", "--budget", "kv=0.5",
                                                                    "--calib-windows", "0"]),
    (lambda: CompressionOptions(budget="kv=0.5", beta=3.0), ["compress", "tiny-llama", "--budget", "kv=0.5",
                                                             "--beta", "3.0"]),
    (lambda: CompressionOptions(budget="kv=0.5", grouping="all"), ["compress", "tiny-llama", "--budget", "kv=0.5",
                                                                   "--grouping", "all"]),
    (lambda: CompileOptions(calib_npz="x.npz"), ["compile", "g.onnx", "--calib-npz", "x.npz"]),
    (lambda: CompileOptions(budget="kv=0.5", plan="p"), ["compile", "g.onnx", "--budget", "kv=0.5", "--plan", "p"]),
]


@pytest.mark.parametrize("make, argv", CASES)
def test_option_errors_are_the_clis(make, argv, tmp_path, capsys):
    with pytest.raises(QsvdError) as caught:
        make()
    code = main([*argv, "-o", str(tmp_path / "out")])
    cli_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert cli_line == f"qsvd-export: error: {caught.value}"
    assert code == caught.value.exit_code == UsageError.exit_code
    assert not (tmp_path / "out").exists()


def test_options_are_frozen_and_typed():
    options = ExportOptions(target="cpu", bits="w4a8")
    with pytest.raises(AttributeError):
        options.bits = "w8a8"  # type: ignore[misc]
    assert options.argv() == ["--target", "cpu", "--bits", "w4a8"]
    assert "--no-verify" in CompressionOptions(budget="kv=0.5", verify=False).argv()
    assert ExportOptions(smooth=False, target="cpu").argv()[-1] == "--no-smooth"


def test_public_names():
    for name in ("export_model", "compress_model", "compile_graph", "load_bundle", "ExportOptions"):
        assert name in qsvd_export.__all__ and callable(getattr(qsvd_export, name))


def test_export_load_and_stream_on_a_tiny_model(tmp_path, monkeypatch):
    result = export_model("tiny-llama", tmp_path / "dense")
    assert result.report["runtimes"]["onnxruntime_genai"]["runs"] is True
    bundle = load_bundle(result.out)
    prompt = "The capital of France is"
    ids = bundle.encode(prompt)
    expected = DecoderRunner(result.out).generate(ids, 8, bundle.config.generation.get("eos_token_ids"))

    steps = []
    original = DecoderRunner.step
    monkeypatch.setattr(DecoderRunner, "step", lambda self, *a: steps.append(1) or original(self, *a))
    stream = bundle.stream_ids(ids, 8)
    assert next(stream) == expected[0] and len(steps) == 1  # the first token comes after the prefill alone
    assert [expected[0], *stream] == expected
    assert len(steps) == len(expected)  # prefill + one decode step per further token, none after the last
    assert "".join(bundle.stream(prompt, 8)) == bundle.generate(prompt, 8)


def test_load_bundle_errors(tmp_path, bundles):
    with pytest.raises(UsageError, match="invalid choice: 'tpu'"):
        load_bundle(bundles.dense("llama"), target="tpu")  # type: ignore[arg-type]
    with pytest.raises(QsvdError, match="bundle folder not found"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(UsageError, match="must be at least 1"):
        list(load_bundle(bundles.dense("llama")).stream_ids([1, 2], 0))


def test_compile_graph_from_a_bundle_graph(tmp_path, bundles):
    result = compile_graph(bundles.dense("llama") / "model.onnx", tmp_path / "graph")
    assert (result.out / "genai_config.json").is_file() and (result.out / "config.json").is_file()
