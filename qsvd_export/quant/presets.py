"""Bit-width presets (``w8a8``, ``w4a16``, …): the weight and activation bits of a target preset or a β search. No torch."""

from __future__ import annotations

from dataclasses import dataclass

from qsvd_export.errors import UsageError


@dataclass(frozen=True)
class Bits:
    weights: int | None  # None = floating point
    activations: int | None

    @property
    def name(self) -> str:
        if self.weights is None:
            return "fp"
        return f"w{self.weights}a{self.activations}"


PRESETS = {"fp": Bits(None, None), "w8a16": Bits(8, 16), "w8a8": Bits(8, 8), "w4a16": Bits(4, 16),
           "w4a8": Bits(4, 8), "w4a4": Bits(4, 4)}


def parse_bits(text: str) -> Bits:
    if text not in PRESETS:
        raise UsageError(f"invalid bit widths '{text}' (choose from {', '.join(PRESETS)})")
    return PRESETS[text]
