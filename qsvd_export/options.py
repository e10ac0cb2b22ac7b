"""Self-validating option dataclasses: a field typed ``Literal[...]`` (or ``Literal[...] | None``) must hold one of
its values, checked on construction with a one-line :class:`~qsvd_export.errors.UsageError`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from qsvd_export.errors import UsageError


def literal_values(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` hint (with ``None`` when optional); None for any other hint."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        values: list[Any] = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                values.append(None)
            elif typing.get_origin(arg) is Literal:
                values.extend(typing.get_args(arg))
            else:
                return None
        return tuple(values)
    return None


def check_choices(options: Any) -> None:
    """Raise :class:`UsageError` naming the first Literal field of dataclass ``options`` outside its values."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        allowed = literal_values(hints[field.name])
        value = getattr(options, field.name)
        if allowed is not None and value not in allowed:
            shown = ", ".join(str(v) for v in allowed if v is not None)
            raise UsageError(f"{field.name.replace('_', '-')} '{value}' is not one of: {shown}")
