"""argparse types shared by the `jetflow` commands: a bad value is a one-line usage
error (exit 2) naming what is wrong, never a traceback or a silent default; and the error
of a value argparse cannot check (:class:`CommandError`, exit 1)."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "seconds", "seconds_or_zero", "CommandError"]


class CommandError(Exception):
    """What a command was given cannot be used: ``jetflow`` prints it as one line (JSON
    with ``--json``) and exits 1."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 or more (``--grace 0``: no grace at all)."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass  # said by seconds()
    return seconds(text)


def seconds(text: str) -> float:
    """A finite, positive number of seconds (nan and inf would reach JSON as null)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value
