"""Validation shared by the settings dataclasses (no torch import: `llada --help` stays fast)."""

from __future__ import annotations

import math


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
