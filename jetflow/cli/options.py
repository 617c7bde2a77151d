"""What the `jetflow` commands share on their command lines: argparse types (a bad value
is a one-line usage error, exit 2, naming what is wrong, never a traceback or a silent
default), the error of a value argparse cannot check (:class:`CommandError`, exit 1), and
the option groups several commands take."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from jetflow.adapters.bus import DEFAULT_URL

__all__ = ["positive_int", "seconds", "seconds_or_zero", "unix_time", "csv", "json_arg",
           "CommandError", "common_options", "data_option", "db_path", "projection_options",
           "read_options", "DEFAULT_DATA", "PROJECTION_FILE"]

DEFAULT_DATA = ".jetflow"
PROJECTION_FILE = "projections.sqlite"


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


def unix_time(text: str) -> float:
    """Unix seconds, or ISO 8601 (``2026-11-22T03:17:31Z``; without a zone: local time)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time after 1970")
    return value


def csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def json_arg(text: str, flag: str, *, object_only: bool = True) -> Any:
    """A JSON object given on the command line, ``@FILE`` (read from the file) or ``-``
    (read from stdin): a command line holds ~200 KB at most, a submission 256 KiB. Else
    a :class:`CommandError` naming ``flag``."""
    if text == "-":
        text, flag = sys.stdin.read(), f"{flag} - (stdin)"
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{flag} {text}: cannot read {path}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        flag = f"{flag} @{path}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{flag} is not valid JSON: {exc}") from None
    if object_only and not isinstance(value, dict):
        raise CommandError(f"{flag} must be a JSON object")
    return value


# -- option groups ----------------------------------------------------------------------------

def common_options(p: argparse.ArgumentParser, *, nats_help: str | None = None,
                   top: bool = False) -> None:
    """The options every command takes. They may come before the command too (``jetflow
    --log-format json submit ...``): the top parser (``top``) holds the defaults, and a
    command's own parser sets only what is given after it."""
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument("--nats", default=default(None), metavar="URL",
                   help=nats_help or f"NATS server or cluster URL (env JETFLOW_NATS_URL, "
                                     f"default {DEFAULT_URL})")
    p.add_argument("--log-level", default=default(os.environ.get("JETFLOW_LOG_LEVEL", "INFO")),
                   help="DEBUG, INFO, WARNING... (env JETFLOW_LOG_LEVEL)")
    p.add_argument("--log-format", choices=("text", "json"),
                   default=default(os.environ.get("JETFLOW_LOG_FORMAT", "text")),
                   help="text, or json for one structured object per line; both carry the "
                        "correlation id and trace id (env JETFLOW_LOG_FORMAT)")
    p.add_argument("--trace-console", action="store_true", default=default(False),
                   help="print spans to stderr (local debugging; also sets "
                        "OTEL_TRACES_EXPORTER for the processes this one starts)")


def data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=DEFAULT_DATA, help=f"data directory (./{DEFAULT_DATA})")


def db_path(a: argparse.Namespace) -> Path:
    """``--db``, else ``<data>/projections.sqlite``."""
    return Path(a.db) if a.db else Path(a.data or DEFAULT_DATA) / PROJECTION_FILE


def projection_options(p: argparse.ArgumentParser, db_help: str = "projection file "
                       f"(default <data>/{PROJECTION_FILE})") -> None:
    p.add_argument("--db", help=db_help)
    p.add_argument("--data", help=f"data directory (default ./{DEFAULT_DATA}, or else the "
                                  "directory of the projector running on this machine)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def read_options(p: argparse.ArgumentParser) -> None:
    """What every read command of the projection takes."""
    common_options(p)
    projection_options(p)
    p.add_argument("--watch", nargs="?", type=seconds, const=2.0, default=None,
                   metavar="SECONDS", help="refresh every SECONDS (2) until Ctrl-C")
