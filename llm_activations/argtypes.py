"""argparse types that validate numbers at the edge: a bad value is one line, exit status 2.

Every command's numeric options use these (cli._Parser turns argparse's error into a UsageError),
so `--workers -3` or `--seq-len 0` never reaches the code that would misuse it.
"""

from __future__ import annotations

import argparse

from llm_activations.format import norms


def integer(minimum: int):
    """An argparse type: an integer >= minimum (e.g. integer(1) for a count, integer(0) for an index)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def norm_ratio(text: str) -> float | None:
    """An argparse type for --max-norm-ratio: a number above 1 (format/norms.py's check), or "none"
    to keep every token."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 1, or none") from None
    try:
        norms.check_ratio(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value

