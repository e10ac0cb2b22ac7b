"""The chat-quality columns of ``benchmarks.run`` (EVAL.md "Chat quality", :mod:`qsvd_export.chat_quality`).

Each chosen row's bundle is scored against the run's dense bundle in one call, so dense's replies and answers
are generated once: KL(dense || bundle) and top-1 agreement on the project's chat prompts (teacher-forced on
dense's greedy reply, the model's chat template), and the closed-book QA answers it keeps of dense's correct
ones. Rows gain ``chat_kl``, ``chat_top1``, ``qa_correct``, ``qa_total``, ``qa_kept``, ``qa_dense_correct``;
the dense row gains its own ``qa_correct`` / ``qa_total``.

``add_chat`` also runs on an earlier run's JSON (``benchmarks.run --from-json RUN.json --measure-chat``): the
measure is deterministic (greedy, teacher-forced), so it is valid on the same bundle files at a later date.
Each row's bundle must still have the graph and weight sizes its run recorded, and the result says when the
chat columns were measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# The rows the issue asks chat measures for (the cpu default, the kv=0.5 latent's cpu default, the npu default)
# and the KV peer that dominates the latent rows on (perplexity, KV bytes).
DEFAULT_CHAT_ROWS = ("ort-gqa-kv8", "ours-w4a8", "ours-latent-kv8", "ours-npu")
ROW_KEYS = ("chat_kl", "chat_top1", "qa_correct", "qa_total", "qa_kept", "qa_dense_correct")


def bundle_sizes(bundle: Path) -> tuple[int, int]:
    """(graph bytes, weight bytes) of a bundle, as ``benchmarks.run`` records them per row."""
    from qsvd_export.build.files import graph_weight_bytes
    from qsvd_export.bundle import load_bundle_config

    config = load_bundle_config(bundle)
    return sum((bundle / g.filename).stat().st_size for g in config.graphs), graph_weight_bytes(bundle, config)


def check_same_bundle(row: dict[str, Any]) -> Path:
    """The row's bundle folder; raises ValueError when it is gone or its sizes differ from the run's record."""
    bundle = Path(row["bundle"])
    if not bundle.is_dir():
        raise ValueError(f"{row['name']}: bundle {bundle} is gone")
    sizes = bundle_sizes(bundle)
    if sizes != (row.get("graph_bytes"), row.get("weight_bytes")):
        raise ValueError(f"{row['name']}: {bundle} has graph/weight bytes {sizes}, the run recorded "
                         f"{(row.get('graph_bytes'), row.get('weight_bytes'))}: not the measured bundle")
    return bundle


def add_chat(result: dict[str, Any], chat_rows: list[str], out: Path, threads: int | None = None,
             prompts: int | None = None, qa: int | None = None, verify_sizes: bool = False,
             raw: bool = False, **lengths: int) -> None:
    """Measure the chat columns of ``chat_rows`` (rows of ``result`` with a bundle) against the dense row's
    bundle and write them into ``result`` (in place), with ``result["chat_protocol"]``. The full JSON (every
    reply and answer) goes to ``out``. ``prompts``/``qa``: the first N of each (quick runs); ``raw``: no chat
    template (tiny test bundles only); ``lengths``: ``reply_tokens``/``answer_tokens`` other than the defaults."""
    from dataclasses import replace

    from qsvd_export.chat_quality import bundle_chat_quality, load_chat_set
    from qsvd_export.runtimes.sessions import SessionOptions

    rows = {r["name"]: r for r in result["rows"]}
    dense = rows.get("dense")
    if dense is None or "bundle" not in dense or "error" in dense:
        raise ValueError("chat quality needs the run's dense row and its bundle")
    chosen = [rows[n] for n in chat_rows if n in rows and "bundle" in rows[n] and "error" not in rows[n]
              and "skipped" not in rows[n]]
    if not chosen:
        return
    check = check_same_bundle if verify_sizes else (lambda row: Path(row["bundle"]))
    bundles = {row["name"]: check(row) for row in chosen}
    chat_set = load_chat_set()
    chat_set = replace(chat_set, prompts=chat_set.prompts[:prompts], qa=chat_set.qa[:qa])
    start = time.perf_counter()
    measured = bundle_chat_quality(check(dense), bundles, "cpu", SessionOptions(threads=threads), chat_set=chat_set,
                                   raw=raw, **lengths)
    settings = measured["settings"]
    result["chat_protocol"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.perf_counter() - start, 1),
        "rows": list(bundles), "raw": str(out),
        "text": f"{settings['prompts']} chat prompts × {settings['reply_tokens']} reply tokens "
                f"({settings['kl']}), {settings['qa']} closed-book questions × {settings['answer_tokens']} "
                "greedy tokens scored by answer match, CPU EP (static npu graphs through their prefill/decode "
                "chunks)"}
    dense.update(qa_correct=measured["dense"]["qa_correct"], qa_total=measured["dense"]["qa_total"])
    for name, summary in measured["bundles"].items():
        rows[name].update(chat_kl=summary["kl_mean"], chat_top1=summary["top1_agreement"],
                          qa_correct=summary["qa_correct"], qa_total=measured["dense"]["qa_total"],
                          qa_kept=summary["qa_kept"], qa_dense_correct=summary["qa_dense_correct"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(measured, indent=1) + "\n")


def qa_cells(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """The QA columns' text: correct answers of all questions, and dense's correct answers kept."""
    correct = f"{row['qa_correct']}/{row['qa_total']}" if row.get("qa_correct") is not None else None
    kept = f"{row['qa_kept']}/{row['qa_dense_correct']}" if row.get("qa_kept") is not None else None
    return correct, kept
