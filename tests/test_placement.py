"""Where the torch stage runs: ``--device`` and accelerate ``--device-map`` (issue 6, big models).

This machine has no GPU: the tests pin map reading and checking, the one-line refusals, and that a
strategy resolves to a plain CPU run giving the same plan as no map at all. The multi-GPU dispatch itself
is checked on a lent GPU (``python -m benchmarks.torch_stage_device``).
"""

from __future__ import annotations

import json

import pytest
import torch
from qsvd_export.compress.budget import parse_budget
from qsvd_export.compress.compressor import compress_model
from qsvd_export.compress.options import CompressOptions
from qsvd_export.compress.placement import read_device_map, resolve_device_map
from qsvd_export.errors import UsageError
from qsvd_export.zoo import load_model

from tests.test_cli_errors import assert_one_line_error, run_cli

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def _write_map(tmp_path, device_map) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "map.json"
    path.write_text(json.dumps(device_map))
    return str(path)


def test_a_json_map_is_read_with_integer_devices_as_cuda(tmp_path):
    assert read_device_map(_write_map(tmp_path, {"model": 0, "lm_head": "cuda:1"})) == {"model": "cuda:0", "lm_head": "cuda:1"}
    assert read_device_map("balanced") == "balanced"


@pytest.mark.parametrize("content, fragment", [
    ("[1, 2]", "expected a JSON object"),
    ("{\"model\": true}", "expected a JSON object"),
    ("{not json", "not a readable JSON object"),
])
def test_unreadable_maps_are_usage_errors(tmp_path, content, fragment):
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=fragment):
        read_device_map(str(path))


def test_maps_must_cover_real_modules_and_keep_them_on_gpus(tmp_path):
    model = load_model("tiny-llama").model
    with pytest.raises(UsageError, match="'model.nope' is not a module"):
        resolve_device_map(model, {"model.nope": "cuda:0", "": "cuda:0"})
    with pytest.raises(UsageError, match="does not give any device"):
        resolve_device_map(model, {"model.embed_tokens": "cuda:0"})
    with pytest.raises(UsageError, match="offloads lm_head to cpu/disk"):
        resolve_device_map(model, {"model": "cuda:0", "lm_head": "cpu"})
    with pytest.raises(UsageError, match="offloads model.layers.1"):
        resolve_device_map(model, {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "disk",
                                   "model.norm": "cuda:0", "model.rotary_emb": "cuda:0", "lm_head": "cuda:0"})


@no_gpu
def test_strategies_mean_the_cpu_without_gpus_and_give_the_same_plan():
    loaded = load_model("tiny-llama")
    assert resolve_device_map(loaded.model, "auto") == {"": "cpu"}
    options = CompressOptions(budget=parse_budget("kv=0.5"), calib_windows=4, calib_length=32, grad_windows=2)
    windows = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0)).numpy()
    plain = compress_model(loaded, options, windows)
    mapped = compress_model(loaded, CompressOptions(**{**options.__dict__, "device_map": "auto"}), windows)
    assert plain.tensors.keys() == mapped.tensors.keys()
    assert all(torch.equal(plain.tensors[name], mapped.tensors[name]) for name in plain.tensors)


@no_gpu
def test_a_gpu_map_without_a_gpu_is_a_runtime_failure(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compress", "tiny-llama", "--budget", "kv=0.5", "--device-map", _write_map(tmp_path, {"": 0}), "-o", str(out))
    assert_one_line_error(proc, 5, "sees no CUDA GPU")
    assert not out.exists()


def test_device_map_cli_refusals(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compress", "tiny-llama", "--budget", "kv=0.5", "--device-map", "everywhere", "-o", str(out))
    assert_one_line_error(proc, 2, "neither a strategy")
    proc = run_cli("compress", "tiny-llama", "--budget", "kv=0.5", "--device", "cuda", "--device-map", "auto", "-o", str(out))
    assert_one_line_error(proc, 2, "exclude each other")
    proc = run_cli("compress", "tiny-llama", "--budget", "kv=0.5", "-o", str(out),
                   "--device-map", _write_map(tmp_path, {"model": 0, "lm_head": "disk"}))
    assert_one_line_error(proc, 2, "offloads lm_head")
    assert not out.exists()
