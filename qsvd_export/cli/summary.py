"""What a finished command prints: the bundle summary, latent cache, mobile and target reports."""

from __future__ import annotations

from typing import Any

from qsvd_export.progress import emit


def print_summary(result: Any) -> None:
    """The table every build ends with (stdout), and a ``summary`` event under --log-json."""
    from qsvd_export.report import summary_table

    summary = result.report["summary"]
    timings = {k: round(v, 3) for k, v in result.timings.items()}
    print(summary_table(result.out, summary, timings))
    emit("summary", bundle=str(result.out), summary=summary, timings_s=timings)


def print_latent(report: dict[str, Any]) -> None:
    latent = report["latent_attention"]
    print(f"wrote absorbed latent attention: {latent['groups']} group(s) per layer, ranks {min(latent['ranks'])}.."
          f"{max(latent['ranks'])}, {latent['cache_bits']}-bit cache, KV {report['kv_bytes_per_token']} B/token, "
          f"attention multiply-adds per cached token {latent['attention_macs_per_cached_token_vs_dense']:.2f}x dense")
    if "perplexity" in report:
        ppl = report["perplexity"]
        print(f"perplexity ({ppl['windows']} x {ppl['length']} of {ppl['text']}): dense {ppl['dense']:.3f} torch, "
              f"compressed {ppl['compressed_onnx']:.3f} ONNX ({ppl['compressed_onnx'] / ppl['dense']:.3f} x dense)")


def print_mobile(report: dict[str, Any]) -> None:
    """One line for --mobile (nothing without it)."""
    mobile = report.get("mobile")
    if not mobile:
        return
    files = ", ".join(f"{g['file']} {g['bytes'] / 1e6:.1f} MB" for g in mobile["graphs"].values())
    check = mobile["verification"]
    print(f"mobile: {files} ({mobile['optimization']} optimizations), {mobile['operators_config']['file']} "
          f"({mobile['operators_config']['operators']} operators); vs ONNX on the CPU EP max |Δ| {check['max_abs_diff']:.2g}")


def print_target(report: dict[str, Any]) -> None:
    """One line per target stage result (nothing without --target)."""
    target = report.get("target")
    if not target or target["bits"] == "fp":
        return
    weights = f"weights {report['weight_bytes'] / 1e6:.1f} MB"
    if target["target"] != "npu":
        print(f"target {target['target']} {target['bits']}: {target['quantized_matmuls']} MatMuls → MatMulNBits, {weights}")
        return
    options = target["options"]
    print(f"target npu {target['bits']}: static prefill ({options['prefill_length']}) + decode graphs, "
          f"{options['context_length']} cache slots, {weights}")
    check = target.get("verification")
    if check is None:
        return
    from qsvd_export.targets.npu.verify import decisive_text
    if check["qnn"].startswith("skipped"):
        print(f"QNN HTP check {check['qnn']}")
        return
    print(f"QNN HTP v{check['htp_arch']}: both graphs {check['qnn']} with CPU fallback disabled; vs the CPU EP: argmax "
          f"agreement {check['argmax_agreement']:.1%} over a prefill window, {decisive_text(check)} (max |Δlogit| "
          f"{check['max_abs_logit_diff']}), "
          f"greedy tokens {'match' if check['tokens_match'] else 'DIFFER'}")

