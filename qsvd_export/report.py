"""Every bundle's ``report.json`` summary (stable keys) and its ``report.md`` with plots.

``report.json["summary"]`` (``summary_version`` 1) always has these keys, ``null`` where they do not
apply: ``model``, ``kind``, ``target`` (cpu/gpu/npu, ``null`` = portable fp32 graph), ``bits``,
``budget``, ``r1``, ``r2``, ``rank_per_layer`` (latent cache rank, ``null`` for a layer left dense),
``kv_bytes_per_token`` (``dense`` and ``ours`` in the bundle's cache dtype), ``weight_bytes``,
``perplexity``, ``ep_nodes`` (nodes per execution provider, and where that was checked),
``tool_versions``. Wall times (compile time included) live in ``timings.json``: they differ between
runs and would break byte-identical bundles. ``report.md`` renders the summary with the plots
(``rank_allocation.png``, ``spectra.png``) that apply; both are deterministic.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import BundleConfig

REPORT_MD = "report.md"
RANK_PLOT = "rank_allocation.png"
SPECTRA_PLOT = "spectra.png"
SUMMARY_VERSION = 1
TOOLS = ("qsvd-export", "onnxruntime", "onnxruntime-qnn", "onnx", "onnxscript", "onnx-ir", "torch", "transformers",
         "numpy")


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in TOOLS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _cache_dtype(config: BundleConfig) -> np.dtype | None:
    """The dtype of the bundle's cache tensors (its activations' float type); None without a cache."""
    tensors = [t for layer in config.cache for t in layer.tensors]
    return np.dtype(tensors[0].dtype) if tensors else None


def dense_kv_bytes(config: BundleConfig, report: dict[str, Any]) -> int | None:
    """Bytes/token a dense K/V cache of this model takes in the bundle's cache dtype (None: encoders)."""
    if config.kind not in ("decoder", "vlm"):
        return None
    if "kv_bytes_per_token_dense_fp16" in report:  # from the plan: per-layer K and V widths
        return int(report["kv_bytes_per_token_dense_fp16"]) * (_cache_dtype(config) or np.dtype("float32")).itemsize // 2
    if not any(layer.kind == "latent" for layer in config.cache):
        return config.kv_bytes_per_token()
    return None


def ep_node_assignment(folder: Path, config: BundleConfig, report: dict[str, Any]) -> dict[str, Any]:
    """Nodes per execution provider, as onnxruntime placed them on this machine.

    npu bundles verified on QNN HTP: the placement the verification recorded, which comes from
    onnxruntime's own EP assignment where it exposes one; otherwise (and for bundles verified before it was
    recorded) all nodes on QNN, inferred only because the sessions were created with CPU fallback disabled,
    and ``source`` says which. Dynamic graphs: onnxruntime's own placement log when it creates a
    session on the target's provider (a profiled first step if the log says nothing); CPU here for a gpu
    bundle when no CUDA provider is installed, said in ``checked_on``."""
    target = report.get("target") or {}
    if config.static_shapes:
        verification = target.get("verification") or {}
        if verification.get("cpu_fallback") != "disabled":
            return {"checked_on": None, "note": "not checked: the QNN HTP verification was skipped", "graphs": {}}
        checked_on = f"QNNExecutionProvider (HTP v{verification['htp_arch']}, CPU fallback disabled)"
        if "placement" in verification:
            return {"checked_on": checked_on, "source": verification["placement_source"],
                    "graphs": verification["placement"]}
        import onnx

        graphs = {spec.role: {"QNNExecutionProvider": len(onnx.load(folder / spec.filename,
                                                                    load_external_data=False).graph.node)}
                  for spec in config.graphs}
        return {"checked_on": checked_on, "graphs": graphs,
                "source": "inferred, not read from the EP: the sessions were created with CPU fallback disabled, "
                          "so all nodes are on QNN HTP"}
    import onnxruntime as ort

    wanted = {"gpu": "CUDAExecutionProvider"}.get(target.get("target", ""), "CPUExecutionProvider")
    provider = wanted if wanted in ort.get_available_providers() else "CPUExecutionProvider"
    graphs = {spec.role: _logged_placement(folder / spec.filename, provider) or
              _profiled_placement(folder / spec.filename, config, provider) for spec in config.graphs}
    result: dict[str, Any] = {"checked_on": provider, "graphs": graphs}
    if provider != wanted:
        result["note"] = f"{wanted} is not installed here; placement on the CPU provider"
    return result


def _with_cpu_fallback(provider: str) -> list[str]:
    return [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])


_PLACED = re.compile(r"placed on \[(\w+)\]\. Number of nodes: (\d+)")


def _logged_placement(graph: Path, provider: str) -> dict[str, int]:
    """Nodes per provider from onnxruntime's verbose "Node placements" log of session creation (nothing
    runs, so the weights stay unread: a > 2 GB graph costs no resident copy). Empty if the log has no
    such lines (the caller then profiles a step)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 0  # VERBOSE: session_state logs the placement per provider
    options.add_session_config_entry("session.disable_prepacking", "1")
    providers = _with_cpu_fallback(provider)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)  # onnxruntime's C++ logger writes to fd 2
        try:
            ort.InferenceSession(str(graph), options, providers=providers)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    counts: dict[str, int] = {}
    for name, count in _PLACED.findall(text):
        counts[name] = counts.get(name, 0) + int(count)
    return dict(sorted(counts.items()))


def _profiled_placement(graph: Path, config: BundleConfig, provider: str) -> dict[str, int]:
    """Distinct nodes per provider in an onnxruntime profile of one 2-token first step."""
    import onnxruntime as ort

    from qsvd_export.runtimes.feeds import first_step_feed

    with tempfile.TemporaryDirectory(prefix="qsvd-placement-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        providers = _with_cpu_fallback(provider)
        session = ort.InferenceSession(str(graph), options, providers=providers)
        cache = {t.input for layer in config.cache for t in layer.tensors}
        feed = first_step_feed(session.get_inputs(), np.ones((1, 2), dtype=np.int64), cache,
                               np.random.default_rng(0))
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            nodes.setdefault(args["provider"], set()).add(event["name"].removesuffix("_kernel_time"))
    return {name: len(found) for name, found in sorted(nodes.items())}


def _rank_per_layer(config: BundleConfig, report: dict[str, Any]) -> list[int | None] | None:
    layers = report.get("layers")
    if not layers:
        return None
    return [layer["latent_rank"] if layer.get("latent_rank") else None for layer in layers]


def build_summary(folder: Path, config: BundleConfig, report: dict[str, Any]) -> dict[str, Any]:
    """The stable ``summary`` of ``report.json`` (see the module docstring)."""
    target = report.get("target") or {}
    return {
        "summary_version": SUMMARY_VERSION,
        "model": config.model_name,
        "kind": config.kind,
        "target": target.get("target"),
        "bits": target["bits"] if target.get("bits") not in (None, "fp") else
        str(_cache_dtype(config) or np.dtype("float32")).replace("float", "fp"),
        "budget": report.get("budget"),
        "r1": report.get("r1"),
        "r2": report.get("r2"),
        "rank_per_layer": _rank_per_layer(config, report),
        "kv_bytes_per_token": {"dense": dense_kv_bytes(config, report), "ours": config.kv_bytes_per_token(),
                               "dtype": str(_cache_dtype(config)) if config.cache else None},
        "weight_bytes": report.get("weight_bytes"),
        "perplexity": report.get("perplexity"),
        "ep_nodes": ep_node_assignment(folder, config, report),
        "tool_versions": tool_versions(),
    }


# ---------------------------------------------------------------- plots

def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """PNG without a timestamp or version in its metadata: the same figure gives the same bytes."""
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    pyplot().close(fig)


def plot_rank_allocation(report: dict[str, Any], path: Path) -> bool:
    """Bars: latent rank per layer beside the dense K+V width (a layer at its width is left dense)."""
    layers = report.get("layers")
    if not layers:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    index = [la["layer"] for la in layers]
    ranks = [la["latent_rank"] for la in layers]
    ax.bar(index, ranks, color="#3b75af", label="latent rank r (cached per token)")
    if all("dense_kv_width" in la for la in layers):
        ax.hlines([la["dense_kv_width"] for la in layers], np.asarray(index) - 0.45, np.asarray(index) + 0.45,
                  color="#444", lw=1.5, label="dense K+V width")
    ax.xaxis.get_major_locator().set_params(integer=True)
    top = max([*ranks, *(la.get("dense_kv_width", 0) for la in layers)])
    ax.set_ylim(0, 1.35 * top)
    ax.set_xlabel("layer")
    ax.set_ylabel("values per token")
    ax.set_title(f"{report.get('model', '')}: rank allocation (R1 {report.get('r1', 0):.3f}, R2 {report.get('r2', 0):.3f})",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_png(fig, path)
    return True


def plot_spectra(report: dict[str, Any], path: Path) -> bool:
    """Whitened singular values (÷ the largest) of a few layers, kept components marked."""
    spectra = report.get("spectra")
    if not spectra:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, (name, entry) in enumerate(sorted(spectra.items(), key=lambda kv: (int(kv[0].split(".")[0]), kv[0]))):
        sigma = np.asarray(entry["sigma"])
        color = f"C{i}"
        layer, members = name.split(".", 1)
        ax.semilogy(np.arange(1, len(sigma) + 1), sigma, color=color, lw=1,
                    label=f"layer {layer} {members.upper()} (kept {len(entry['kept'])})")
        kept = np.asarray(entry["kept"], dtype=int)
        ax.scatter(kept + 1, sigma[kept], color=color, s=3)
    ax.set_xlabel("component (descending σ); dots: kept by the allocation")
    ax.set_ylabel("σ / σ₁ (whitened)")
    ax.set_title("singular-value spectra of the joint projections", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    return True


# ---------------------------------------------------------------- report.md

def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.1f} MB"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a summary: report.md's table and the CLI's end-of-run table."""
    kv = summary["kv_bytes_per_token"]
    rows = [("model", f"{summary['model']} ({summary['kind']})"),
            ("target / bits", f"{summary['target'] or 'none (portable graph)'} / {summary['bits']}")]
    if summary["budget"] is not None:
        rows += [("budget", ", ".join(f"{k}={v}" for k, v in summary["budget"].items() if v is not None)),
                 ("R1 (Q/K/V params) / R2 (KV cache)", f"{summary['r1']:.3f} / {summary['r2']:.3f}")]
    if kv["ours"]:
        ratio = f" ({kv['ours'] / kv['dense']:.2f}× dense {kv['dense']:,})" if kv["dense"] else ""
        rows.append((f"KV cache bytes/token ({kv['dtype']})", f"{kv['ours']:,}{ratio}"))
    rows.append(("weights on disk", _mb(summary["weight_bytes"])))
    ppl = summary["perplexity"]
    if ppl:
        rows.append((f"perplexity ({ppl['windows']} × {ppl['length']} {ppl['text']})",
                     f"dense {ppl['dense']:.3f}, this bundle {ppl['compressed_onnx']:.3f} "
                     f"({ppl['compressed_onnx'] / ppl['dense']:.3f}×)"))
    placement = summary["ep_nodes"]
    if placement.get("checked_on"):
        text = "; ".join(f"{role}: " + ", ".join(f"{n} on {p}" for p, n in counts.items())
                         for role, counts in placement["graphs"].items())
        source = f"; {placement['source']}" if placement.get("source") else ""
        rows.append(("node placement", f"{text} (checked on {placement['checked_on']}{source})"))
    else:
        rows.append(("node placement", placement.get("note", "not checked")))
    ranks = summary["rank_per_layer"]
    if ranks:
        rows.append(("latent rank per layer", ", ".join("dense" if r is None else str(r) for r in ranks)))
    return rows


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in summary["tool_versions"].items() if v)
    lines = [f"# Report: {summary['model']}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in summary_rows(summary)]
    lines += ["", f"Tools: {versions}.", "",
              "Wall times of the build (compile time per stage) are in `timings.json`; they vary between runs, "
              "so they stay out of this report and `report.json`, which are the same bytes for the same inputs "
              "and seed.", ""]
    titles = {RANK_PLOT: "Rank allocation", SPECTRA_PLOT: "Singular-value spectra"}
    for plot in plots:
        lines += [f"## {titles[plot]}", "", f"![{titles[plot]}]({plot})", ""]
    return "\n".join(lines)


def summary_table(folder: Path, summary: dict[str, Any], timings: dict[str, float]) -> str:
    """The plain-text table the CLI prints at the end of a build (summary rows + compile time)."""
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in timings.items())
    rows = [("bundle", str(folder)), *summary_rows(summary),
            ("compile time", f"{sum(timings.values()):.1f} s ({stages})"),
            ("report", str(folder / REPORT_MD))]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def write_report(folder: Path, config: BundleConfig, report: dict[str, Any]) -> dict[str, Any]:
    """The ``summary`` of ``report`` (the bundle's report.json content, without a summary); draws the plots that
    apply and writes ``report.md``. The caller puts the summary into report.json."""
    report = {k: v for k, v in report.items() if k != "summary"}
    summary = build_summary(folder, config, report)
    plots = [name for name, draw in ((RANK_PLOT, plot_rank_allocation), (SPECTRA_PLOT, plot_spectra))
             if draw(report, folder / name)]
    (folder / REPORT_MD).write_text(render_markdown(summary, plots))
    return summary
