"""ONNX Runtime session factory keyed by target.

- ``cpu``: CPUExecutionProvider.
- ``gpu``: CUDAExecutionProvider (needs an onnxruntime build with CUDA).
- ``npu``: Qualcomm QNN EP from the ``onnxruntime-qnn`` plugin package with the HTP backend. The plugin
  library is registered once with ``onnxruntime.register_execution_provider_library``. With
  ``strict=True`` the session config ``session.disable_cpu_ep_fallback=1`` makes session creation fail
  unless every node runs on the NPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsvd_export.errors import RuntimeFailure, UsageError

TARGETS = ("cpu", "gpu", "npu")
QNN_EP = "QNNExecutionProvider"
_registered_plugins: set[str] = set()


@dataclass
class SessionOptions:
    """What a caller may tune; everything else follows the target."""

    threads: int | None = None
    strict: bool = False  # npu: disable CPU fallback
    htp_arch: str | None = None  # npu: e.g. "73", "75"; None keeps the backend default
    extra_config: dict[str, str] = field(default_factory=dict)
    optimization: str = "all"  # "all" | "basic" | "none"
    profile_prefix: str | None = None  # write an ORT profile (JSON trace) with this file prefix


def _qnn_plugin() -> Any:
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        raise RuntimeFailure("target npu needs the QNN execution provider; fix: pip install 'qsvd-export[npu]'")
    import onnxruntime as ort
    import onnxruntime_qnn

    if QNN_EP not in _registered_plugins:
        try:
            ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain Exception subclasses
            if "already registered" not in str(exc):
                raise RuntimeFailure(f"could not register the QNN plugin EP: {exc}") from None
        _registered_plugins.add(QNN_EP)
    return onnxruntime_qnn


def qnn_devices() -> list[Any]:
    """The QNN EP devices onnxruntime sees after registering the plugin (empty if none)."""
    import onnxruntime as ort

    _qnn_plugin()
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]


def create_session(model_path: str | Path, target: str = "cpu", options: SessionOptions | None = None) -> Any:
    """Create an ``onnxruntime.InferenceSession`` for ``model_path`` on ``target``."""
    import onnxruntime as ort

    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    options = options or SessionOptions()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = options.threads or min(os.cpu_count() or 1, 8)
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[options.optimization]
    if options.profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = options.profile_prefix
    for key, value in options.extra_config.items():
        so.add_session_config_entry(key, value)
    providers: list[Any] | None = None
    if target == "cpu":
        providers = ["CPUExecutionProvider"]
    elif target == "gpu":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeFailure(
                "target gpu needs onnxruntime with the CUDA execution provider (pip install onnxruntime-gpu)"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        plugin = _qnn_plugin()
        devices = qnn_devices()
        if not devices:
            raise RuntimeFailure("the QNN execution provider reports no device")
        npu = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.NPU] or devices
        provider_options = {"backend_path": plugin.get_qnn_htp_path()}
        if options.htp_arch:
            provider_options["htp_arch"] = options.htp_arch
        so.add_provider_for_devices(npu[:1], provider_options)
        if options.strict:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    except Exception as exc:  # noqa: BLE001
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise RuntimeFailure(f"could not create a {target} session for {Path(model_path).name}: {first_line}") from None
