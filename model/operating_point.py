"""The probability threshold a checkpoint operates at (light: no torch, so config checks can use it)."""

from __future__ import annotations

#: Probability threshold of a checkpoint that carries no calibrated operating point.
DEFAULT_THRESHOLD = 0.5


def is_threshold(value: object) -> bool:
    """Whether ``value`` is a usable probability threshold: a number strictly between 0 and 1."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0
