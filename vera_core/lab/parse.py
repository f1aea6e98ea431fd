"""Comma-separated lists typed into the CLI and the app ("8, 64"), parsed with one wording for every mistake."""
from __future__ import annotations

import math


def _items(text: str, what: str, example: str) -> list[str]:
    """The comma-separated items of `text`; an empty list or an empty item ("256,,512") is refused, since it is
    more likely a typo than a wish."""
    items = [v.strip() for v in str(text).split(",")]
    if items == [""]:
        raise ValueError(f"{what} is empty; enter comma-separated values such as {example}.")
    if "" in items:
        raise ValueError(f"{what} has an empty item in {text!r}; enter comma-separated values such as {example}.")
    return items


def _numbers(text: str, what: str, kind: type, noun: str, example: str, valid, need: str) -> list:
    items = _items(text, what, example)
    try:
        values = [kind(v) for v in items]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated {noun} such as {example}; got {text!r}.") from None
    if not all(valid(v) for v in values):
        raise ValueError(f"{what} must be {need}; got {text!r}.")
    return values


def int_list(text: str, what: str) -> list[int]:
    """"8, 64" -> [8, 64]: positive integers separated by commas."""
    return _numbers(text, what, int, "integers", "8,64", lambda v: v > 0, "positive integers")


def seed_list(text: str, what: str = "seeds") -> list[int]:
    """"0, 1, 2" -> [0, 1, 2]: integers >= 0 separated by commas (repeats are refused by RunRequest)."""
    return _numbers(text, what, int, "integers", "0,1,2", lambda v: v >= 0, "integers >= 0")


def float_list(text: str, what: str) -> list[float]:
    """"0.1, 1" -> [0.1, 1.0]: finite numbers separated by commas."""
    return _numbers(text, what, float, "numbers", "0.1,1.0", math.isfinite, "finite numbers")
