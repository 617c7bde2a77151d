"""Built-in handlers for tests and the demo. A handler is ``fn(args, ctx) -> JSON value``;
it runs in a child process, so printing and crashing are both safe."""

from __future__ import annotations

import time
from typing import Any

from jetflow.workers.context import JobContext, PermanentError

__all__ = ["echo", "sleep", "fail"]


def echo(args: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Return the arguments unchanged."""
    return args


def sleep(args: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Sleep ``seconds`` (default 1), printing a line before and after."""
    seconds = float(args.get("seconds", 1.0))
    print(f"sleeping {seconds}s", flush=True)
    time.sleep(seconds)
    print("awake", flush=True)
    return {"slept": seconds}


def fail(args: dict[str, Any], ctx: JobContext) -> None:
    """Raise: ``{"message": ..., "permanent": true}`` skips the retries."""
    message = str(args.get("message", "failed on purpose"))
    if args.get("permanent"):
        raise PermanentError(message)
    raise RuntimeError(message)
