"""The target stage a build ends with, as one frozen request that every recipe (dense, compressed, from-graph, VLM)
takes in place of loose keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from qsvd_export.build.kv_cache import KvCacheOptions
    from qsvd_export.targets.npu.options import NpuOptions


@dataclass(frozen=True)
class TargetRequest:
    """``target`` (a name in :data:`qsvd_export.targets.TARGETS`) at preset ``bits`` (None: the target's default).

    ``strict``: the target's checks fail the build instead of reporting; ``npu``: the npu target's options;
    ``verify``: run the target's verification (npu: QNN HTP sessions); ``kv``: the cache of fused attention (cpu);
    ``latent_cache_bits``: a QSVD latent cache as 8- or 4-bit codes (cpu; 8, 4, "auto" = 8 where the graph has
    one, None = float). Validated on construction (:meth:`check`)."""

    target: str
    bits: str | None = None
    strict: bool = False
    npu: NpuOptions | None = None
    verify: bool = True
    kv: KvCacheOptions | None = None
    latent_cache_bits: Literal[8, 4, "auto"] | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        from qsvd_export.build.stages import check_target_options
        from qsvd_export.errors import UsageError

        check_target_options(self.target, self.bits)
        if self.npu is not None and self.target != "npu":
            raise UsageError(f"npu options were given for target {self.target}")
        if self.latent_cache_bits is not None and self.target != "cpu":
            raise UsageError(f"a coded latent cache is built for --target cpu (got {self.target})")
        if self.latent_cache_bits not in (None, 8, 4, "auto"):
            raise UsageError(f"latent cache bits must be 8, 4 or 'auto', got {self.latent_cache_bits!r}")
