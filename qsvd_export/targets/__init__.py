"""Targets: one :class:`~qsvd_export.targets.policy.TargetPolicy` per execution provider, in :data:`TARGETS`.

``cpu`` (:mod:`.cpu`), ``gpu`` (:mod:`.gpu`) and ``npu`` (:mod:`.npu`). The CLI's ``--target`` choices and
``--bits`` help are read from the registry; :func:`register` adds one (a plugin, or a test's dummy).
``w4a4`` is refused everywhere: no target runs 4-bit activations.
"""

from __future__ import annotations

from qsvd_export.errors import UsageError
from qsvd_export.targets.cpu import CPU
from qsvd_export.targets.gpu import GPU
from qsvd_export.targets.npu import NPU
from qsvd_export.targets.policy import PLAIN_CAUSAL_TYPES, TargetPolicy, plain_causal

TARGETS: dict[str, TargetPolicy] = {policy.name: policy for policy in (CPU, GPU, NPU)}

__all__ = ["PLAIN_CAUSAL_TYPES", "TARGETS", "TargetPolicy", "plain_causal", "policy_for", "register"]


def register(policy: TargetPolicy) -> None:
    """Add ``policy`` to :data:`TARGETS` (replacing one of the same name)."""
    TARGETS[policy.name] = policy


def policy_for(target: str) -> TargetPolicy:
    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    return TARGETS[target]
