"""Value checks shared by the command line and the library: numbers in a range, memory sizes,
argparse ``type=`` validators built from them, and text made safe to print on a terminal.

A command-line argument is checked by argparse while the command line is parsed, so a bad
value ends the command (exit status 2) before any work starts; the library calls
:func:`in_range` with the same limits.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def in_range(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """``value`` if it is a finite number (an int when ``integer``; never a bool) within
    ``[low, high]`` (open ends as asked), else ``ValueError`` naming ``name``, the value and
    the allowed range."""
    kind = "an integer" if integer else "a number"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    span = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    number = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = number and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {kind} in {span}, got {value!r}.")
    return value


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses an int (``integer``) or float and checks its range."""

    def parse(text: str) -> Any:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        try:
            return in_range(
                value, "the value", low, high, low_open=low_open, high_open=high_open,
                integer=integer,
            )  # fmt: skip
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removesuffix(".")) from None

    parse.__name__ = "integer" if integer else "number"  # argparse names it on errors
    return parse


positive_int = number(1, integer=True)
count = number(0, integer=True)
port = number(1, 65535, integer=True)
probability = number(0.0, 1.0)
non_negative = number(0.0)
positive = number(0.0, low_open=True)


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1.5G"`` or a number of bytes -> bytes (at least 1)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(in_range(text, "memory_budget", 1))
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 2GB, 512MB or 1.5G.")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"{text!r} is no memory at all; write e.g. 2GB, 512MB or 1.5G.")
    return value


def memory_size(text: str) -> str:
    """argparse ``type=`` for a memory size: checked now, kept as written."""
    try:
        parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removesuffix(".")) from None
    return text


def printable(value: Any) -> str:
    """``str(value)`` with terminal control characters (escape sequences, carriage returns,
    bidirectional overrides) written as ``\\x1b``-style escapes, so that text from a file
    (class names, labels, paths) cannot act on the terminal it is printed to."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))
