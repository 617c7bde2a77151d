"""A pool of child processes that run handlers, isolated from the worker.

One job at a time per child. A child that crashes (segfault, ``os._exit``, killed by the
OOM killer) fails only its attempt, with the exit code or signal recorded, and is
replaced; a child that runs past the attempt's timeout is killed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jetflow.core.codec import dumps, loads
from jetflow.workers.frames import HEADER, PARENT_ENV, encode_frame

__all__ = ["ChildPool", "Outcome", "OUTPUT_STREAM", "PROGRESS_STREAM"]

log = logging.getLogger("jetflow.worker")

LineSink = Callable[[str, str], None]  # (stream, line)
PROGRESS_STREAM = "@progress"  # the sink's stream for a plugin's progress (a JSON line)
OUTPUT_STREAM = "@output"  # and for an output stream the child is about to send


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: ``kind`` is succeeded, failed or timed_out."""

    kind: str
    result: Any = None
    error: dict[str, Any] = field(default_factory=dict)
    duration_ms: float = 0.0


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._sink: LineSink | None = None  # where its stderr lines go: the running job's
        self._stderr_task = asyncio.create_task(self._pump_stderr())

    @classmethod
    async def spawn(cls, env: dict[str, str] | None = None,
                    python: str = sys.executable) -> Child:
        # Its own session: Ctrl-C in a terminal (SIGINT to the foreground process group)
        # is the worker's to handle (drain), not a KeyboardInterrupt in a running job. It
        # dies with the worker (see jetflow.workers.child).
        proc = await asyncio.create_subprocess_exec(
            python, "-m", "jetflow.workers.child", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}, limit=2**24,
            start_new_session=True)
        return cls(proc)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def run(self, job: dict[str, Any], sink: LineSink) -> Outcome:
        assert self.proc.stdin and self.proc.stdout
        self._sink = sink
        try:
            self.proc.stdin.write(encode_frame(job))
            await self.proc.stdin.drain()
            while True:
                frame = await self._read_frame()
                if frame is None:
                    return await self._crashed()
                if frame.get("t") == "log":
                    sink(frame.get("stream", "stdout"), frame.get("line", ""))
                    continue
                if frame.get("t") == "progress":  # the line: {"done", "total"}
                    sink(PROGRESS_STREAM, dumps({"done": frame.get("done"),
                                                 "total": frame.get("total")}).decode())
                    continue
                if frame.get("t") == "output":  # {"name", "path"[, "quarantine_of"]}
                    sink(OUTPUT_STREAM, dumps({k: v for k, v in frame.items()
                                               if k != "t"}).decode())
                    continue
                return _outcome(frame)
        except (BrokenPipeError, ConnectionResetError):
            return await self._crashed()
        finally:
            await asyncio.sleep(0)  # let stderr lines already written reach this job
            self._sink = None

    async def _read_frame(self) -> dict[str, Any] | None:
        assert self.proc.stdout
        try:
            head = await self.proc.stdout.readexactly(HEADER.size)
            body = await self.proc.stdout.readexactly(HEADER.unpack(head)[0])
        except asyncio.IncompleteReadError:
            return None
        frame: dict[str, Any] = loads(body)
        return frame

    async def _pump_stderr(self) -> None:
        """For the child's life: each stderr line to the running job (between jobs, to
        the worker's log)."""
        assert self.proc.stderr
        while True:
            try:
                line = await self.proc.stderr.readline()
            except ValueError:  # a line over the reader's limit: dropped by it, said here
                line = b"[jetflow: a stderr line over the 16 MiB limit was dropped]\n"
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\n")
            if self._sink is not None:
                self._sink("stderr", text)
            else:
                log.info("child %d, between jobs: %s", self.proc.pid, text)

    async def _stop_stderr(self) -> None:
        """Once the child has exited: the rest of its stderr, then the reader ends."""
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._stderr_task, 1.0)
        self._stderr_task.cancel()

    async def _crashed(self) -> Outcome:
        code = await self.proc.wait()
        await self._stop_stderr()
        if code < 0:
            name = signal.Signals(-code).name
            message = f"child process killed by signal {name}"
        else:
            message = f"child process exited with code {code}"
        return Outcome("failed", error={"error_type": "ChildCrashed", "message": message,
                                        "retryable": True, "exit_code": code})

    async def kill(self) -> None:
        """Kill the child and every process its handler started (its process group: the
        child leads a session of its own), so a cancelled, timed-out or handed-back job
        leaves no subprocess of its own running."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.alive:
            self.proc.kill()
        await self.proc.wait()
        await self._stop_stderr()


def _outcome(frame: dict[str, Any]) -> Outcome:
    if frame.get("t") == "result":
        return Outcome("succeeded", result=frame.get("result"),
                       duration_ms=float(frame.get("duration_ms", 0.0)))
    error = {k: frame.get(k) for k in ("error_type", "message", "retryable", "traceback")}
    return Outcome("failed", error=error)


class ChildPool:
    """``size`` warm children; ``run`` borrows one, and replaces it if it died."""

    def __init__(self, size: int, *, memory_limit_mb: int | None = None) -> None:
        self.size = size
        self.env = {"JETFLOW_CHILD_MEMORY_MB": str(memory_limit_mb)} if memory_limit_mb else {}
        self._idle: asyncio.Queue[Child] = asyncio.Queue()
        self._all: set[Child] = set()

    async def start(self) -> None:
        """Start the children one by one, each known to :meth:`stop` as soon as it runs
        (a start cancelled half way leaves none behind)."""
        for _ in range(self.size):
            child = await Child.spawn(self.env)
            self._all.add(child)
            self._idle.put_nowait(child)

    async def run(self, job: dict[str, Any], sink: LineSink,
                  timeout_s: float | None = None) -> Outcome:
        child = await self._idle.get()
        try:
            return await asyncio.wait_for(child.run(job, sink), timeout_s)
        except TimeoutError:
            await child.kill()
            return Outcome("timed_out", error={"error_type": "Timeout", "retryable": True,
                                               "message": f"run timeout of {timeout_s:g}s"})
        except asyncio.CancelledError:
            await child.kill()
            raise
        finally:
            await self._give_back(child)

    async def run_in(self, python: str, job: dict[str, Any], sink: LineSink,
                     timeout_s: float | None = None) -> Outcome:
        """Run ``job`` in a child of its own started with ``python`` (a plugin's
        environment), in one of the pool's slots; the child is stopped after it."""
        slot = await self._idle.get()
        child: Child | None = None
        try:
            child = await Child.spawn(self.env, python)
            self._all.add(child)
            return await asyncio.wait_for(child.run(job, sink), timeout_s)
        except TimeoutError:
            return Outcome("timed_out", error={"error_type": "Timeout", "retryable": True,
                                               "message": f"run timeout of {timeout_s:g}s"})
        finally:
            if child is not None:
                self._all.discard(child)
                await child.kill()
            self._idle.put_nowait(slot)

    async def _give_back(self, child: Child) -> None:
        if child.alive:
            self._idle.put_nowait(child)
            return
        self._all.discard(child)
        try:
            fresh = await Child.spawn(self.env)
        except Exception:  # noqa: BLE001 - keep serving with fewer children
            log.exception("cannot start a replacement child process")
            return
        self._all.add(fresh)
        self._idle.put_nowait(fresh)

    async def stop(self) -> None:
        for child in list(self._all):
            if child.proc.stdin:
                child.proc.stdin.close()
        for child in list(self._all):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 2.0)
            await child.kill()  # and what its handlers left running in its group
        self._all.clear()
