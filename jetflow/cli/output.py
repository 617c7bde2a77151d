"""How a command says it could not go on: one line, or JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["error"]


def error(args: argparse.Namespace, message: str, *, code: int = 1,
          **context: object) -> int:
    """One line on stderr; with ``--json``, ``{"error": ..., **context}`` on stdout
    instead, so a program reading the output gets JSON either way. Returns ``code``, the
    exit code (1 unless said otherwise)."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, **context}), flush=True)
    else:
        print(f"error: {message}", file=sys.stderr)
    return code
