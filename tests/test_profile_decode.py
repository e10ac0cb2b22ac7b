"""benchmarks.profile_decode: only decode steps are profiled, also when the prefill is several runs (chunks)."""

from __future__ import annotations

from benchmarks import profile_decode
from qsvd_export.runtimes.decode import DecoderRunner


def test_profile_counts_decode_steps_only_after_a_chunked_prefill(bundles) -> None:  # type: ignore[no-untyped-def]
    dense = bundles.dense("llama")  # fp32, unfused attention: a 600-token prompt is prefilled as 512 + 88
    assert DecoderRunner(dense).prefill_chunk == 512
    result = profile_decode.profile(dense, context=600, steps=3, threads=1, warmup=1)
    assert result["steps"] == 3
    assert 0 < sum(result["groups_ms_per_step"].values()) <= result["ms_per_step"]
