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
from collections.abc import Callable
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
                   top: bool = False, context_flag: bool = True) -> None:
    """The options every command takes. They may come before the command too (``jetflow
    --log-format json submit ...``): the top parser (``top``) holds the defaults, and a
    command's own parser sets only what is given after it."""
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument("--nats", default=default(None), metavar="URL",
                   help=nats_help or f"NATS server or cluster URL (env JETFLOW_NATS_URL, "
                                     f"default {DEFAULT_URL})")
    credential_options(p, default, context_flag)
    p.add_argument("--log-level", default=default(os.environ.get("JETFLOW_LOG_LEVEL", "INFO")),
                   help="DEBUG, INFO, WARNING... (env JETFLOW_LOG_LEVEL)")
    p.add_argument("--log-format", choices=("text", "json"),
                   default=default(os.environ.get("JETFLOW_LOG_FORMAT", "text")),
                   help="text, or json for one structured object per line; both carry the "
                        "correlation id and trace id (env JETFLOW_LOG_FORMAT)")
    p.add_argument("--trace-console", action="store_true", default=default(False),
                   help="print spans to stderr (local debugging; also sets "
                        "OTEL_TRACES_EXPORTER for the processes this one starts)")


# flag -> (Credentials field, what it is): each also from its JETFLOW_* variable
CREDENTIAL_FLAGS = {
    "--context": ("context", "a nats CLI context file (url, user/password, token, nkey, "
                             "creds, ca/cert/key)"),
    "--user": ("user", "NATS user name"),
    "--password": ("password", "NATS password (prefer the environment variable: a flag "
                               "shows in the process list)"),
    "--token": ("token", "NATS token (prefer the environment variable)"),
    "--nkey": ("nkey", "file holding an nkey seed"),
    "--creds": ("creds", "a .creds file (JWT and nkey seed)"),
    "--tls-ca": ("ca", "CA certificate file that signed the server's"),
    "--tls-cert": ("cert", "client certificate file (TLS)"),
    "--tls-key": ("key", "client key file (TLS)"),
}


FILES = {"context", "nkey", "creds", "ca", "cert", "key"}  # made absolute when exported


def credential_options(p: argparse.ArgumentParser, default: Callable[[object], object],
                       context_flag: bool = True) -> None:
    """How to authenticate to NATS, the NATS way; no value is ever shown in ``--help``.
    ``--nats-context`` is ``--context`` too, except where a command has a ``--context`` of
    its own (``workflow start``)."""
    from jetflow.adapters.auth import ENV

    group = p.add_argument_group("credentials (flags win over the environment)")
    for flag, (name, what) in CREDENTIAL_FLAGS.items():
        flags = [flag] if flag != "--context" else \
            (["--context", "--nats-context"] if context_flag else ["--nats-context"])
        group.add_argument(*flags, dest=f"cred_{name}", default=default(None),
                           metavar="FILE" if "file" in what else "VALUE",
                           help=f"{what} (env {ENV[name]})")


def export_credentials(a: argparse.Namespace) -> None:
    """The credential flags given into the environment: every connection this process
    makes, and the processes it starts, use them."""
    from jetflow.adapters.auth import ENV

    for name, var in ENV.items():
        value = getattr(a, f"cred_{name}", None)
        if value is not None:
            os.environ[var] = str(Path(value).resolve()) if name in FILES else value


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
