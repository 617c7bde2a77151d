"""Example handlers for the demo and the failure tests: well-behaved and badly-behaved.

Bind them with ``jetflow worker --handlers crash=examples.handlers:segfault,...``.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from jetflow import JobContext, PermanentError


def segfault(args: dict[str, Any], ctx: JobContext) -> None:
    """Dereference NULL: the child dies of SIGSEGV."""
    ctypes.string_at(0)


def hard_exit(args: dict[str, Any], ctx: JobContext) -> None:
    """Leave without cleanup, with the given code."""
    os._exit(int(args.get("code", 3)))


def hog(args: dict[str, Any], ctx: JobContext) -> int:
    """Allocate ``mb`` megabytes (MemoryError under a --memory-limit)."""
    block = bytearray(int(args.get("mb", 512)) * 1024 * 1024)
    return len(block)


def fail_once(args: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Fail permanently the first time (marker file absent), succeed afterwards."""
    marker = Path(args["marker"])
    if not marker.exists():
        marker.write_text(ctx.job_id)
        raise PermanentError("first time fails")
    return {"attempt": ctx.attempt}


def chatty(args: dict[str, Any], ctx: JobContext) -> int:
    """Print ``lines`` lines, ``every`` seconds apart."""
    for i in range(int(args.get("lines", 3))):
        print(f"line {i}", flush=True)
        time.sleep(float(args.get("every", 0.0)))
    return int(args.get("lines", 3))


def long_lines(args: dict[str, Any], ctx: JobContext) -> str:
    """One line of ``stdout`` bytes on stdout and one of ``stderr`` bytes on stderr."""
    import sys

    print("o" * int(args.get("stdout", 0)), flush=True)
    print("e" * int(args.get("stderr", 0)), file=sys.stderr, flush=True)
    return "done"


def trace_env(args: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """What a plugin sees of its trace, after doing some work in a span of its own.

    With tracing on, the worker's child process has made its ``run <handler>`` span
    current and put it in ``TRACEPARENT``; a span the plugin starts (here with the plain
    OpenTelemetry API) becomes its child. ``JETFLOW_CORRELATION_ID`` is the job's
    correlation id.
    """
    from opentelemetry import trace

    with trace.get_tracer("examples.handlers").start_as_current_span("plugin work") as span:
        span.set_attribute("example.items", int(args.get("items", 1)))
    return {"traceparent": os.environ.get("TRACEPARENT"),
            "correlation_id": os.environ.get("JETFLOW_CORRELATION_ID"),
            "ctx_correlation_id": ctx.correlation_id}


def subprocess_sleep(args: dict[str, Any], ctx: JobContext) -> int:
    """Run ``sleep SECONDS`` as a subprocess (its pid written to ``pid_file``) and wait."""
    proc = subprocess.Popen(["sleep", str(args.get("seconds", 30))])
    Path(args["pid_file"]).write_text(str(proc.pid))
    return proc.wait()
