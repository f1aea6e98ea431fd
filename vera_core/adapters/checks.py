"""Input checks shared by configs, the CLI and the app: one wording for every "must be a positive integer"."""
from __future__ import annotations

import math


def positive_int(name: str, value, optional: bool = False) -> None:
    """ValueError unless `value` is an int > 0 (or None when `optional`); bools are refused."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}. "
                         f"Use for example {name}=8.")


def finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def positive_float(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number{' or None' if optional else ''}, got {value!r}.")
