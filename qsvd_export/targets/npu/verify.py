"""QNN HTP: context binaries, placement of nodes on the EP, and the greedy check against the CPU EP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from qsvd_export.bundle import LayerCache
from qsvd_export.errors import RuntimeFailure
from qsvd_export.targets.npu.options import CONTEXT_FILES, GRAPH_FILES, NpuOptions, require_qnn


def precompile_contexts(folder: Path, options: NpuOptions) -> dict[str, Any]:
    """Compile both QDQ graphs on QNN HTP (CPU fallback disabled) and write EPContext models
    (``prefill_ctx.onnx`` + ``prefill_ctx_qnn.bin``, same for decode): a device loads the binary
    instead of compiling at start-up. Returns {role: context model file} and the compile times."""
    from qsvd_export.runtimes.sessions import SessionOptions, create_session

    require_qnn("--precompile")
    files, timings = {}, {}
    for role, filename in GRAPH_FILES.items():
        start = time.perf_counter()
        config = {"ep.context_enable": "1", "ep.context_file_path": str(folder / CONTEXT_FILES[role]),
                  "ep.context_embed_mode": "0"}
        try:
            create_session(folder / filename, "npu", SessionOptions(strict=True, htp_arch=options.htp_arch,
                                                                    extra_config=config))
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"QNN HTP (htp_arch {options.htp_arch}) could not compile {filename}: {exc}") from None
        if not (folder / CONTEXT_FILES[role]).is_file():
            raise RuntimeFailure(f"QNN EP wrote no context model for {filename}")
        files[role] = CONTEXT_FILES[role]
        timings[f"qnn_{role}_context_s"] = round(time.perf_counter() - start, 1)
    return {"files": files, "timings": timings}


def greedy_after_window(decoder: Any, window: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Prefill one full window, then ``steps`` greedy tokens; returns the window's logits and the tokens."""
    logits, state = decoder.step(decoder.empty_state(), window)
    window_logits, tokens = logits, []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        if len(tokens) < steps:
            logits, state = decoder.step(state, [tokens[-1]])
    return window_logits, tokens


DECISIVE_MARGIN = 1.0  # logits: a top-1 lead no rounding difference between two backends should overturn


def decisive_agreement(logits: np.ndarray, reference: np.ndarray, margin: float = DECISIVE_MARGIN) -> dict[str, Any]:
    """Argmax agreement of ``logits`` [n, vocab] with ``reference`` at the positions where the reference's
    top-1 leads its top-2 by at least ``margin``: near-ties flip under any rounding change, a decisive
    position that flips means one backend computes something else. Returns the rate and the count."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= margin
    same = logits.argmax(-1) == reference.argmax(-1)
    if not decisive.any():  # no evidence either way: undefined, not 100%
        return {"decisive_positions": 0, "decisive_argmax_agreement": None,
                "decisive_note": f"undefined: no position where the reference's top-1 leads by >= {margin} logit"}
    return {"decisive_positions": int(decisive.sum()),
            "decisive_argmax_agreement": round(float(np.mean(same[decisive])), 4)}


def decisive_text(check: dict[str, Any]) -> str:
    """The decisive agreement in words, e.g. "97.5% at the 80 positions the CPU EP decides by >= 1 logit";
    "undefined" when there were none (never read as 100%)."""
    if check.get("decisive_argmax_agreement") is None:
        return f"undefined at decisive positions (none: the CPU EP led by >= {DECISIVE_MARGIN:g} logit nowhere)"
    return (f"{check['decisive_argmax_agreement']:.1%} at the {check['decisive_positions']} positions the CPU EP "
            f"decides by >= {DECISIVE_MARGIN:g} logit")


EP_ASSIGNMENT_CONFIG = "session.record_ep_graph_assignment_info"


def ep_placement(session: Any) -> dict[str, int] | None:
    """Nodes per execution provider as onnxruntime assigned them in ``session`` (created with
    :data:`EP_ASSIGNMENT_CONFIG` = "1"); None when this onnxruntime does not expose the assignment."""
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        return None
    try:
        subgraphs = getter()
    except Exception:  # noqa: BLE001 - an onnxruntime without the recording raises a plain error
        return None
    counts: dict[str, int] = {}
    for subgraph in subgraphs:
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return dict(sorted(counts.items())) or None


def qnn_placement(sessions: dict[str, Any], graph_nodes: dict[str, int]) -> dict[str, Any]:
    """Where the nodes of each graph run: from onnxruntime's own EP assignment when it exposes it (per
    graph, nodes per provider, ``nodes_on_cpu`` counted from it); otherwise inferred, saying so: the
    sessions were created with CPU fallback disabled, so all ``graph_nodes`` must be on QNN HTP."""
    placed = {role: ep_placement(session) for role, session in sessions.items()}
    if all(counts is not None for counts in placed.values()):
        return {"placement": placed, "placement_source": "onnxruntime get_provider_graph_assignment_info",
                "nodes_on_cpu": sum(c.get("CPUExecutionProvider", 0) for c in placed.values())}
    return {"placement": {role: {"QNNExecutionProvider": count} for role, count in graph_nodes.items()},
            "placement_source": "inferred, not read from the EP: onnxruntime exposes no assignment here; the "
                                "sessions were created with CPU fallback disabled, so all nodes are on QNN HTP",
            "nodes_on_cpu": None}


def verify_on_qnn(folder: Path, cache: list[LayerCache], tokenizer: Any, options: NpuOptions,
                  contexts: dict[str, str] | None = None) -> dict[str, Any]:
    """QNN HTP sessions (CPU fallback disabled) for both graphs — from the context binaries when
    ``contexts`` names them; one prefill window of ``wiki_eval`` and ``verify_tokens`` greedy decode steps
    on HTP and on the CPU EP (same QDQ graphs): per-position argmax agreement and max |Δlogit| over the
    window, and whether the greedy tokens match."""
    import importlib.util

    from qsvd_export.data import read_text, token_windows
    from qsvd_export.runtimes.sessions import SessionOptions
    from qsvd_export.runtimes.static_decode import StaticDecoder

    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return {"qnn": "skipped: onnxruntime-qnn is not installed (pip install 'qsvd-export[npu]')"}
    paths = [folder / GRAPH_FILES["prefill"], folder / GRAPH_FILES["decode"]]
    npu_paths = [folder / contexts[role] for role in GRAPH_FILES] if contexts else paths
    start = time.perf_counter()
    try:
        npu = StaticDecoder.from_files(*npu_paths, cache, options.context_length, options.prefill_length, "npu",
                                       SessionOptions(strict=True, htp_arch=options.htp_arch,
                                                      extra_config={EP_ASSIGNMENT_CONFIG: "1"}))
    except RuntimeFailure as exc:
        raise RuntimeFailure(f"QNN HTP (htp_arch {options.htp_arch}, CPU fallback disabled) refused the graphs: {exc}") from None
    compile_s = time.perf_counter() - start
    cpu = StaticDecoder.from_files(*paths, cache, options.context_length, options.prefill_length, "cpu")
    window = [int(t) for t in token_windows(tokenizer, read_text("wiki_eval"), options.prefill_length, 1,
                                            source="wiki_eval")[0]]
    start = time.perf_counter()
    npu_logits, npu_tokens = greedy_after_window(npu, window, options.verify_tokens)
    run_s = time.perf_counter() - start
    cpu_logits, cpu_tokens = greedy_after_window(cpu, window, options.verify_tokens)
    import onnx

    roles = {options.prefill_length: "prefill", 1: "decode"}
    graph_nodes = {role: len(onnx.load(str(path), load_external_data=False).graph.node)
                   for role, path in zip(GRAPH_FILES, npu_paths)}
    return {
        "qnn": "loaded from context binaries" if contexts else "compiled", "htp_arch": options.htp_arch,
        "cpu_fallback": "disabled",
        **qnn_placement({roles[length]: session for length, session in npu.sessions.items()}, graph_nodes),
        "timings": {"qnn_session_s": round(compile_s, 1), "qnn_run_s": round(run_s, 1)},
        "window": f"first {options.prefill_length} tokens of wiki_eval",
        "argmax_agreement": round(float(np.mean(npu_logits.argmax(-1) == cpu_logits.argmax(-1))), 4),
        **decisive_agreement(npu_logits, cpu_logits),
        "max_abs_logit_diff": round(float(np.abs(npu_logits - cpu_logits).max()), 4),
        "median_abs_logit_diff": round(float(np.median(np.abs(npu_logits - cpu_logits))), 4),
        "tokens_npu": npu_tokens, "tokens_cpu": cpu_tokens, "tokens_match": npu_tokens == cpu_tokens,
    }

