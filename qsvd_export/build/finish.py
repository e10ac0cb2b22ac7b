"""The target stage and the last steps inside the temporary bundle folder (target files, mobile, runtime
files, report.md, README, timings)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qsvd_export.bundle import CONFIG_NAME, BundleConfig, write_json

if TYPE_CHECKING:
    from qsvd_export.build.request import TargetRequest


def apply_target(model: ir.Model, request: TargetRequest | None,
                 plain_causal: bool = False, latent: dict[int, Any] | None = None) -> dict[str, Any] | None:
    """The target stage after the graph stage: quantize for the requested target's policy (None: leave fp32).
    ``plain_causal``: :func:`qsvd_export.targets.plain_causal` of the source model; ``latent``: the KV cache
    layouts of its fused attention (:func:`latent_kv_layers`)."""
    if request is None:
        return None
    target, bits = request.target, request.bits
    from onnx_ir.passes import common

    from qsvd_export.passes.chain import check_model
    from qsvd_export.targets import policy_for

    policy = policy_for(target)
    chosen = policy.bits(bits)
    if policy.static_graphs:
        return {"target": target, "bits": chosen.name}  # static graphs + QDQ are built on files: finish_target
    report = {"target": target, "bits": chosen.name, **policy.quantize(model, chosen, plain_causal, latent)}
    common.RemoveUnusedNodesPass()(model)
    check_model(model)
    return report


def finish_target(folder: Path, config: BundleConfig, target_report: dict[str, Any] | None,
                  request: TargetRequest | None, tokenizer: Any,
                  timings: dict[str, float] | None = None) -> dict[str, Any] | None:
    """File-level target steps once ``folder`` holds ``model.onnx``: for ``request.latent_cache_bits`` 8 or 4 (cpu)
    the coded latent cache I/O (:mod:`qsvd_export.targets.latent_cache`, config rewritten; "auto": only where the graph
    caches a latent), then the cpu/gpu check of ONNX Runtime's optimized graph, or for npu the static
    prefill/decode QDQ graphs replacing ``model.onnx`` (config rewritten) and their QNN HTP verification. Returns
    the completed target report (wall times go to ``timings``, never into the deterministic report)."""
    if target_report is None or request is None:
        return None
    from qsvd_export.targets import policy_for
    from qsvd_export.targets.latent_cache import latent_cache_bits_for, quantize_latent_cache

    latent_bits = latent_cache_bits_for(request, config)
    if latent_bits is not None:  # 8 or 4, on target cpu (TargetRequest.check)
        start = time.perf_counter()
        target_report["latent_cache"] = quantize_latent_cache(folder, config, tokenizer, bits=latent_bits)
        if timings is not None:
            timings["latent_cache_s"] = time.perf_counter() - start
    policy = policy_for(target_report["target"])
    return policy.finish(folder, config, target_report, request.strict, tokenizer, request.npu, request.verify,
                         timings if timings is not None else {})


def finish_bundle(folder: Path, config: BundleConfig, report: dict[str, Any], mobile: bool,
                  timings: dict[str, float]) -> None:
    """Last steps inside the temporary bundle folder once the graphs and config are final: ``--mobile``
    packaging (.ort graphs, reduced-build operator config, their verification; ``mobile.py`` updates
    qsvd_config.json), the runtime files (genai, optimum), the summary and ``report.md``, then the one write of
    ``report.json`` (``report`` plus ``mobile``, ``runtimes`` and ``summary``), the bundle README and
    ``timings.json``. A dynamic decoder's config records its prefill chunk (:func:`prefill_chunk_for`)."""
    from qsvd_export.bundle_readme import write_readme
    from qsvd_export.report import write_report
    from qsvd_export.runtimes.decode import prefill_chunk_for

    if config.kind in ("decoder", "vlm") and not config.static_shapes:
        config.prefill_chunk = prefill_chunk_for(folder / config.graph("model").filename)
        (folder / CONFIG_NAME).write_text(config.to_json())
    if mobile:
        from qsvd_export.progress import info
        from qsvd_export.targets.mobile import package_mobile

        info("mobile: ORT-format graphs, required_operators.config and a parity check on the CPU EP")
        report["mobile"] = package_mobile(folder, config, timings)
    from qsvd_export.runtime_files import readme_section, write_runtime_files

    if "kv_bytes_per_token" in report:  # the target may have changed the cache's element type (npu --kv-bits)
        report["kv_bytes_per_token"] = config.kv_bytes_per_token()
    report["runtimes"] = write_runtime_files(folder, config, (report.get("target") or {}).get("target"))
    report = json.loads(json.dumps(report))  # JSON types (lists, string keys), as every reader of the file sees them
    start = time.perf_counter()
    report["summary"] = write_report(folder, config, report)
    timings["report_s"] = time.perf_counter() - start
    write_json(folder / "report.json", report)
    write_readme(folder)
    with (folder / "README.md").open("a") as readme:  # genai / optimum: how to open the bundle, or why not
        readme.write(readme_section(report["runtimes"]))
    write_json(folder / "timings.json", {k: round(v, 3) for k, v in timings.items()})
