"""A child process that runs handlers, one job at a time: ``python -m jetflow.workers.child``.

Frames come in on stdin and go out on a private copy of stdout; the real stdout (fd 1)
is pointed at stderr, so anything a handler or a C library prints becomes a log line
instead of corrupting the protocol. ``print()`` inside a handler is sent as a log frame.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
import traceback
from typing import IO, Any

import orjson

from jetflow.adapters import tracing
from jetflow.adapters.runtime import die_with_parent
from jetflow.core.codec import dumps
from jetflow.workers.context import JobContext, PermanentError
from jetflow.workers.frames import PARENT_ENV, encode_frame, read_frame_sync
from jetflow.workers.handlers import HandlerError, resolve
from jetflow.workers.spans import traced_run


class _LineWriter:
    """sys.stdout for handlers: each complete line becomes a log frame."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._send({"t": "log", "stream": "stdout", "line": line})
        return len(text)

    def flush(self) -> None:
        if self._buf:
            self._send({"t": "log", "stream": "stdout", "line": self._buf})
            self._buf = ""


@traced_run
def _run(job: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    ctx = JobContext(job["job_id"], job["attempt"], job.get("correlation_id"), job["queue"])
    try:
        if job.get("plugin"):
            from jetflow.workers.plugin_run import run_plugin  # pyarrow: only when needed

            result = run_plugin(job["plugin"], job.get("args") or {}, job["job_id"],
                                job["attempt"])
        else:
            result = resolve(job["ref"])(job.get("args") or {}, ctx)
        dumps(result)  # must be JSON; fail the attempt here, not in the worker
    except PermanentError as exc:
        return _error(exc, retryable=False)
    except HandlerError as exc:
        return _error(exc, retryable=False)
    except orjson.JSONEncodeError as exc:
        return {"t": "error", "error_type": "ResultNotJSON", "retryable": False,
                "message": f"handler result is not JSON serializable: {exc}"}
    except BaseException as exc:  # noqa: BLE001 - MemoryError, SystemExit...: the attempt fails
        return _error(exc, retryable=True)
    finally:
        sys.stdout.flush()
    return {"t": "result", "result": result,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3)}


def _error(exc: BaseException, *, retryable: bool) -> dict[str, Any]:
    return {"t": "error", "error_type": type(exc).__name__, "message": str(exc)[:4000],
            "retryable": retryable, "traceback": traceback.format_exc()[-8000:]}


def _limit_memory() -> None:
    """JETFLOW_CHILD_MEMORY_MB caps this process's address space: a handler that needs
    more gets MemoryError (its attempt fails), not the machine's OOM killer."""
    limit = os.environ.get("JETFLOW_CHILD_MEMORY_MB")
    if limit:
        size = int(limit) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))


def _left_to_the_worker(signum: int, frame: object) -> None:
    """A stop signal is the worker's to act on (see :func:`main`)."""


def main() -> None:
    # Killed when its worker dies, however it dies: a busy orphan would go on running a job
    # whose lease lapses and that runs again elsewhere (Linux; elsewhere an orphan
    # finishes its job, then reads EOF).
    die_with_parent(PARENT_ENV, signal.SIGKILL)
    # A stop signal meant for the whole group (systemd's default KillMode, a `kill` of the
    # group) is the worker's to act on: it drains, then stops this child with EOF or
    # SIGKILL. A handler (not SIG_IGN) is reset by exec, so a handler's own subprocesses
    # still get the default action.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _left_to_the_worker)
    tracing.setup("plugin")  # before the memory limit: its exporter thread needs a stack
    _limit_memory()
    try:
        _serve()
    finally:
        tracing.shutdown()  # flush this child's spans


def _route_progress(send: Any) -> None:
    """A plugin's ctx.progress(done, total) becomes a progress frame to the worker, and
    its outputs' streams are announced in frames (the hooks module imports no pyarrow:
    a handler child stays light)."""
    import jetflow.workers.plugin_hooks as hooks

    hooks.send_progress = lambda done, total: send({"t": "progress", "done": done,
                                                    "total": total})
    hooks.send_frame = send


def _serve() -> None:
    out: IO[bytes] = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)

    def send(frame: dict[str, Any]) -> None:
        out.write(encode_frame(frame))

    sys.stdout = _LineWriter(send)
    _route_progress(send)
    stdin = sys.stdin.buffer
    while True:
        job = read_frame_sync(stdin)
        if job is None:
            return
        send(_run(job))


if __name__ == "__main__":
    main()
