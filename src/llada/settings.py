"""Validation shared by the settings dataclasses (no torch import: `llada --help` stays fast)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def require_positive_ints(settings: object, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_non_negative_numbers(settings: object, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not value >= 0
            or math.isinf(value)
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def settings_from_dict(cls: type[T], data: dict[str, Any], kind: str) -> T:
    """A settings dataclass from a dict (a --config file), refusing unknown keys by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {kind} settings {unknown}; known: {sorted(known)}")
    return cls(**data)
