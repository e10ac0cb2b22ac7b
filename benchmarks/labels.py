"""Row labels of the peer table computed from each row's build record, never typed by hand.

A peer's label is its tool's base name (``benchmarks.run.ROWS``) followed by the settings its build
record holds: per-channel or per-tensor weights, reduce_range, the int8 dot-product flags of the CPU it
was built on (int8), block size and accuracy_level (MatMulNBits, read back from the built graph),
activation/weight types and calibration (QNN recipe). A setting the record lacks is said to be
unrecorded, not guessed.
"""

from __future__ import annotations

from typing import Any


def _on_off(value: Any) -> str:
    return "unrecorded" if value is None else "on" if value else "off"


def _int8(options: dict[str, Any]) -> str:
    scales = {True: "per-channel", False: "per-tensor"}.get(options.get("per_channel"), "unrecorded")
    parts = [f"{scales} {options.get('weight_type', 'unrecorded')} weights",
             f"reduce_range {_on_off(options.get('reduce_range'))}"]
    flags = options.get("cpu_int8_dot_flags")
    if flags is not None:
        parts.append("built on a CPU with " + (", ".join(flags) if flags else "no VNNI/AMX int8 flags"))
    elif "cpu_vnni" in options:
        parts.append(f"built on a CPU {'with' if options['cpu_vnni'] else 'without'} VNNI")
    return "; ".join(parts)


def _int4(options: dict[str, Any]) -> str:
    symmetric = {True: "symmetric", False: "asymmetric"}.get(options.get("is_symmetric"), "symmetry unrecorded")
    level = options.get("accuracy_level", "unrecorded")
    return (f"block {options.get('block_size', 'unrecorded')}, {symmetric}, "
            f"accuracy_level {'unset' if level is None else level}")


def _qnn(options: dict[str, Any]) -> str:
    scales = {True: "per-channel", False: "per-tensor"}.get(options.get("per_channel"), "unrecorded")
    return (f"{options.get('activation_type', '?')} activations / {options.get('weight_type', '?')} {scales} "
            f"weights, {options.get('calibration', 'calibration unrecorded')}")


def _kv(options: dict[str, Any]) -> str:
    return (f"{options.get('cache_bits', '?')}-bit {options.get('cache_form', 'cache')}, static per-channel scales, "
            f"{options.get('weights', '?')} weights")


_SETTINGS = {"ort-int8": _int8, "ort-int4-b32": _int4, "ort-int4-b128": _int4, "ort-qnn-u16u8": _qnn,
             "ort-gqa-kv8": _kv, "ort-gqa-kv4": _kv}


def row_label(row: dict[str, Any], base: str) -> str:
    """``base`` plus the settings in ``row["build"]["options"]`` for a peer row; ``base`` for the others.
    A peer without a build record (skipped, failed before building) says so."""
    describe = _SETTINGS.get(row["name"])
    if describe is None or row.get("family") != "peer":
        return base
    options = row.get("build", {}).get("options")
    if options is None:
        return f"{base} (no build record)"
    return f"{base} ({describe(options)})"
