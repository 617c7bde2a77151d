"""The worker: the execution plane's adapter.

``receive -> claim -> execute -> record -> ack``, one function each. A claim is the
``started`` event appended with the expected subject sequence the dispatch carried, so of
any number of workers offered the same attempt exactly one runs it; a late result from a
worker that lost its lease fails the same check and is dropped (and logged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any

from nats.aio.msg import Msg

from core import subjects as S
from core.bus import (
    TIMEOUTS,
    Conflict,
    EventLog,
    Publisher,
    connect,
    ensure_streams,
    work_consumer,
)
from core.codec import dumps, loads
from core.events import Event
from core.runtime import supervise
from workers.handlers import parse_handlers, resolve
from workers.pool import ChildPool, Outcome

__all__ = ["Worker", "make_worker_id"]

log = logging.getLogger("jetflow.worker")
MAX_RESULT_BYTES = 256 * 1024


def make_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}-{secrets.token_hex(2)}"


class Worker:
    def __init__(self, url: str | None = None, *, handlers: str | dict[str, str] = "echo",
                 queues: tuple[str, ...] = ("default",), concurrency: int = 4,
                 heartbeat_s: float = 2.0, lease_s: float = 15.0, grace_s: float = 30.0,
                 prefetch: int | None = None, worker_id: str | None = None) -> None:
        self.url = url
        self.handlers = parse_handlers(handlers) if isinstance(handlers, str) else handlers
        for name in queues:
            S.check_token(name, "queue")
        self.queues = tuple(queues)
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else prefetch
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.worker_id = S.check_token(worker_id or make_worker_id(), "worker id")
        self.running: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> Worker:
        for ref in self.handlers.values():
            resolve(ref)  # fail now, clearly, on a typo or a broken plugin
        self.pool = ChildPool(self.concurrency)
        await self.pool.start()
        self.nc = await connect(self.url, name=f"jetflow-worker-{self.worker_id}")
        self.js = self.nc.jetstream()
        await ensure_streams(self.js)
        self.log = EventLog(Publisher(self.nc))
        await self.nc.subscribe(S.worker_subject(self.worker_id, "lost"), cb=self._on_lost)
        await self._heartbeat()
        await self._announce()
        self._tasks = [asyncio.create_task(supervise("heartbeat", self._heartbeat_loop)),
                       asyncio.create_task(supervise("work", self._work_loop))]
        log.info("worker %s ready: handlers %s, queues %s, concurrency %d", self.worker_id,
                 ",".join(self.handlers), ",".join(self.queues), self.concurrency)
        return self

    async def _announce(self) -> None:
        event = Event("worker", self.worker_id, "joined", time.time(), {
            "handlers": sorted(self.handlers), "queues": list(self.queues),
            "concurrency": self.concurrency, "prefetch": self.prefetch,
            "host": socket.gethostname(), "pid": os.getpid(), "lease_s": self.lease_s})
        await self.log.append(event, msg_id=f"worker:{self.worker_id}:joined:{event.at}")

    async def _on_lost(self, msg: Msg) -> None:
        if not self._draining:
            log.warning("the sentinel declared this worker lost; joining again")
            await self._announce()

    async def drain(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, then leave."""
        self._draining = True
        for task in self._tasks[1:]:
            task.cancel()
        running = list(self.running.values())
        if running:
            log.info("draining: waiting up to %.0fs for %d running job(s)", self.grace_s,
                     len(running))
            _done, late = await asyncio.wait(running, timeout=self.grace_s)
            for task in late:
                task.cancel()
        await self._leave("drained" if self._draining else "stopped")
        await self.stop()

    async def _leave(self, reason: str) -> None:
        event = Event("worker", self.worker_id, "left", time.time(), {"reason": reason})
        try:
            await self.log.append(event, msg_id=f"worker:{self.worker_id}:left")
        except Exception as exc:  # noqa: BLE001 - the sentinel will find us lost instead
            log.warning("could not record leaving: %s", exc)

    async def stop(self) -> None:
        for task in [*self._tasks, *self.running.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self.running.values(), return_exceptions=True)
        await self.pool.stop()
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    # -- heartbeats ---------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        body = {"at": time.time(), "running": sorted(self.running),
                "free": self.concurrency - len(self.running), "draining": self._draining}
        await self.nc.publish(S.heartbeat_subject(self.worker_id), dumps(body))

    # -- receive ------------------------------------------------------------------------
    async def _work_loop(self) -> None:
        sub = await self.js.pull_subscribe(S.work_subject(self.worker_id), stream=S.WORK_STREAM,
                                           config=work_consumer(self.worker_id, self.lease_s))
        while not self._draining:
            free = self.concurrency - len(self.running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                msgs = await sub.fetch(free, timeout=1.0)
            except TIMEOUTS:
                continue
            for msg in msgs:
                self._spawn(msg)

    def _spawn(self, msg: Msg) -> None:
        try:
            work = loads(msg.data)
            job_id = work["job_id"]
        except Exception:  # noqa: BLE001 - a malformed dispatch is dropped, loudly
            log.error("dropping malformed dispatch on %s: %r", msg.subject, msg.data[:200])
            asyncio.ensure_future(msg.term())
            return
        if job_id in self.running:
            asyncio.ensure_future(msg.ack())  # a duplicate offer of a job we are running
            return
        self.running[job_id] = asyncio.create_task(self._handle(msg, work))

    async def _handle(self, msg: Msg, work: dict[str, Any]) -> None:
        job_id = work["job_id"]
        try:
            started_seq = await self._claim(work, dict(msg.headers or {}))
            await msg.ack()
            if started_seq is None:
                return
            outcome = await self._execute(work)
            await self._record(work, outcome, started_seq, dict(msg.headers or {}))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected error in the worker", job_id)
        finally:
            self.running.pop(job_id, None)
            self._slot_freed.set()

    # -- claim / execute / record ---------------------------------------------------------
    async def _claim(self, work: dict[str, Any], headers: dict[str, str]) -> int | None:
        """Append ``started``; return its sequence, or None if somebody else moved first."""
        attempt = work["attempt"]
        event = Event("job", work["job_id"], "started", time.time(),
                      {"attempt": attempt, "worker": self.worker_id, "lease_s": self.lease_s})
        headers.pop(S.HDR_MSG_ID, None)
        try:
            ack = await self.log.append(
                event, expected_seq=work["seq"], headers=headers,
                msg_id=f"{work['job_id']}:started:{attempt}:{self.worker_id}")
        except Conflict:
            log.debug("job %s attempt %d: claimed elsewhere or changed", work["job_id"], attempt)
            return None
        if ack.duplicate:
            return None  # our own earlier claim of this attempt: that one is running it
        return ack.seq

    async def _execute(self, work: dict[str, Any]) -> Outcome:
        job_id, attempt = work["job_id"], work["attempt"]
        subject = S.log_subject(job_id, attempt)

        def sink(stream: str, line: str) -> None:
            asyncio.ensure_future(self.nc.publish(subject, line.encode(),
                                                  headers={"Jf-Stream": stream}))

        job = {"job_id": job_id, "attempt": attempt, "ref": self.handlers[work["handler"]],
               "args": work.get("args") or {}, "queue": work.get("queue", ""),
               "correlation_id": work.get("correlation_id")}
        return await self.pool.run(job, sink, work.get("timeout_s"))

    async def _record(self, work: dict[str, Any], outcome: Outcome, started_seq: int,
                      headers: dict[str, str]) -> None:
        job_id, attempt = work["job_id"], work["attempt"]
        event = Event("job", job_id, outcome.kind, time.time(),
                      _outcome_data(outcome, attempt, self.worker_id))
        headers.pop(S.HDR_MSG_ID, None)
        try:
            await self.log.append(event, expected_seq=started_seq, headers=headers,
                                  msg_id=f"{job_id}:{outcome.kind}:{attempt}:{self.worker_id}")
        except Conflict:
            log.warning("job %s attempt %d: result dropped, this worker lost the lease "
                        "(another event was recorded first)", job_id, attempt)


def _outcome_data(outcome: Outcome, attempt: int, worker_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {"attempt": attempt, "worker": worker_id,
                            "duration_ms": outcome.duration_ms}
    if outcome.kind == "succeeded":
        result = outcome.result
        if len(dumps(result)) > MAX_RESULT_BYTES:
            result = {"truncated": True, "note": f"result over {MAX_RESULT_BYTES} bytes"}
        data["result"] = result
    elif outcome.kind == "timed_out":
        data["reason"] = outcome.error.get("message", "timeout")
        data["kind"] = "run"
    else:
        error = outcome.error
        data.update(error_type=str(error.get("error_type") or "Error"),
                    message=str(error.get("message") or ""),
                    retryable=bool(error.get("retryable", True)))
        if error.get("exit_code") is not None:
            data["exit_code"] = error["exit_code"]
        if error.get("traceback"):
            data["traceback"] = error["traceback"]
    return data
