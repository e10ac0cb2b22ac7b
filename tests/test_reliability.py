"""Determinism and interrupted runs."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from qsvd_export.cli import main

SMALL = ["--calib-windows", "4", "--calib-length", "64", "--grad-windows", "2", "-q"]
DETERMINISTIC = ("model.onnx", "model.onnx.data", "plan.json", "plan.safetensors", "qsvd_config.json", "report.json",
                 "report.md", "rank_allocation.png", "spectra.png", "README.md")


def _digest(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in DETERMINISTIC if (folder / name).exists()}


def test_two_runs_give_identical_bundle_bytes(tmp_path):
    for name in ("a", "b"):
        assert main(["compress", "tiny-qwen2", "--budget", "kv=0.5", "-o", str(tmp_path / name), *SMALL]) == 0
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert set(a) == set(DETERMINISTIC)
    assert a == b
    # nor by where qsvd-export is installed: the exporter's stack traces (source paths) are dropped
    graph = (tmp_path / "a" / "model.onnx").read_bytes()
    assert b"stack_trace" not in graph and str(Path(__file__).resolve().parent.parent).encode() not in graph


def test_sigterm_during_a_run_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    slow = ["--calib-windows", "64", "--calib-length", "64", "--grad-windows", "64", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "qsvd_export", "compress", "tiny-llama", "--budget", "kv=0.5",
                             "-o", str(out), *slow], stderr=subprocess.PIPE, text=True)
    time.sleep(5)  # imports done, calibration running
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("qsvd-export: error: interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_that_a_library_wraps_into_its_own_error_still_exits_130(monkeypatch, capsys):
    """torch's argument parsing turns the handler's exception into a TypeError (seen during export): the
    run still ends as an interrupt, not as an internal error."""
    from qsvd_export import cli

    def wrapped(args):  # type: ignore[no-untyped-def]
        try:
            cli._on_sigterm(signal.SIGTERM, None)
        except Exception as exc:  # noqa: BLE001 - what the library does
            raise TypeError(f"empty_strided(): argument 'stride' failed to unpack ({exc})") from None

    from qsvd_export import errors

    monkeypatch.setattr(errors, "_terminated", False)
    monkeypatch.setitem(cli.COMMANDS, "models", wrapped)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "qsvd-export: error: interrupted by SIGTERM; no output written"


def test_interrupt_while_writing_the_bundle_leaves_no_output(tmp_path, monkeypatch, capsys):
    import qsvd_export.build.compressed as compressed

    real = compressed.write_bundle

    def write_then_interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)  # graph, weights and config are on disk in the temporary folder
        raise KeyboardInterrupt

    monkeypatch.setattr(compressed, "write_bundle", write_then_interrupt)
    out = tmp_path / "out"
    assert main(["compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out), *SMALL]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
