"""Synthetic but valid event logs, for the replay benchmark and the projection tests.

:func:`synthetic_log` interleaves many jobs the way a busy system does (a pool of jobs in
flight, each advanced one legal event at a time): successes, failures with retries, dead
letters, rejections, progress events, workers joining and leaving. It is deterministic for
a seed. Every job event carries the headers the sentinel copies onto a job's events
(``traceparent``, ``Jf-Correlation-Id``) and a ``Nats-Msg-Id``, as real appends do.
:func:`publish_log` appends such a log to JF_EVENTS, pipelined.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from jetflow.adapters.bus import Ack, Publisher
from jetflow.core import subjects as S
from jetflow.core.codec import encode_event
from jetflow.core.events import Event

__all__ = ["synthetic_log", "publish_log", "Appended"]

Appended = tuple[Event, dict[str, str]]


@dataclass
class _Job:
    job_id: str
    queue: str
    handler: str
    max_attempts: int
    plan: list[str]  # outcome of each attempt: "ok" or "fail"
    attempt: int = 0
    steps: list[tuple[str, dict[str, object]]] = field(default_factory=list)


class _Log:
    def __init__(self, seed: int, workers: int, t0: float) -> None:
        self.rnd = random.Random(seed)
        self.workers = [f"w{seed}-{i}" for i in range(workers)]
        self.t = t0
        self.jobs = 0

    def tick(self) -> float:
        self.t += self.rnd.uniform(0.0001, 0.002)
        return round(self.t, 6)

    def new_job(self) -> _Job | None:
        """A new job; None for a submission that is rejected at once."""
        self.jobs += 1
        rnd = self.rnd
        job_id = f"j{self.jobs:08d}"
        if rnd.random() < 0.03:
            return None
        max_attempts = rnd.choice((1, 2, 3))
        plan = ["fail" if rnd.random() < 0.15 else "ok" for _ in range(max_attempts)]
        return _Job(job_id, rnd.choice(("default", "default", "images")),
                    rnd.choice(("echo", "resize", "fail")), max_attempts, plan)


def synthetic_log(events: int, *, seed: int = 0, workers: int = 4, in_flight: int = 64,
                  t0: float = 1_800_000_000.0) -> Iterator[Appended]:
    """``events`` appends (event, headers) of a plausible, valid history."""
    log = _Log(seed, workers, t0)
    emitted = 0
    for worker in log.workers:
        event = _joined(worker, log.tick())
        yield event, _headers(event)
        emitted += 1
    active: list[_Job] = []
    while emitted < events:
        job = log.new_job() if len(active) < in_flight else None
        if len(active) < in_flight and job is None:
            event = _rejected(log)
        else:
            if job is not None:
                active.append(job)
            index = log.rnd.randrange(len(active))
            event, done = _next_event(active[index], log)
            if done:
                active[index] = active[-1]
                active.pop()
        yield event, _headers(event)
        emitted += 1


def _joined(worker: str, at: float) -> Event:
    return Event("worker", worker, "joined", at, {
        "handlers": ["echo", "fail", "resize"], "queues": ["default", "images"],
        "concurrency": 16, "host": "bench", "pid": 1000 + int(worker.rsplit("-", 1)[-1])})


def _rejected(log: _Log) -> Event:
    return Event("job", f"j{log.jobs:08d}", "rejected", log.tick(),
                 {"reason": "unknown handler 'nope'", "code": "unknown_handler",
                  "queue": "default"})


def _headers(event: Event) -> dict[str, str]:
    if event.kind != "job":
        return {S.HDR_MSG_ID: f"worker:{event.id}:{event.type}:{event.at}"}
    trace = f"{int(event.id[1:]) + 1:032x}"
    return {S.HDR_TRACEPARENT: f"00-{trace}-{'1' * 16}-01", S.HDR_CORRELATION_ID: event.id,
            S.HDR_MSG_ID: f"job:{event.id}:{event.type}:{event.at}"}


def _next_event(job: _Job, log: _Log) -> tuple[Event, bool]:
    """The job's next event, and whether the job is then finished."""
    if not job.steps:
        job.steps = _attempt_steps(job, log)
    type_, data = job.steps.pop(0)
    done = not job.steps and type_ in ("succeeded", "dead_lettered")
    return Event("job", job.job_id, type_, log.tick(), data), done


def _attempt_steps(job: _Job, log: _Log) -> list[tuple[str, dict[str, object]]]:
    if job.attempt == 0:
        submitted = {"queue": job.queue, "handler": job.handler, "args": {"n": log.jobs},
                     "priority": log.rnd.randrange(10), "max_attempts": job.max_attempts,
                     "correlation_id": job.job_id}
        return [("submitted", submitted), *_run(job, log)]
    return _run(job, log)


def _run(job: _Job, log: _Log) -> list[tuple[str, dict[str, object]]]:
    job.attempt += 1
    n, worker = job.attempt, log.rnd.choice(log.workers)
    steps: list[tuple[str, dict[str, object]]] = [
        ("queued", {"attempt": n}), ("started", {"attempt": n, "worker": worker,
                                                 "lease_s": 15.0})]
    if log.rnd.random() < 0.1:
        steps.append(("progress", {"attempt": n, "done": 0.5}))
    if job.plan[n - 1] == "ok":
        return [*steps, ("succeeded", {"attempt": n, "worker": worker,
                                       "result": {"n": n, "ok": True}})]
    steps.append(("failed", {"attempt": n, "error_type": "RuntimeError", "message": "boom",
                             "retryable": True, "worker": worker}))
    if n >= job.max_attempts:
        return [*steps, ("dead_lettered", {"reason": f"gave up after {n} attempt(s)"})]
    return [*steps, ("retry_scheduled", {"attempt": n + 1, "not_before": log.t + 0.5})]


async def publish_log(nc: NATS, appends: Iterable[Appended], *, window: int = 8192) -> int:
    """Append every event to JF_EVENTS (pipelined, every ack checked); return the count."""
    publisher = Publisher(nc, max_in_flight=window)
    pending: list[asyncio.Future[Ack]] = []
    count = 0
    for event, headers in appends:
        subject = S.event_subject(event.kind, event.id, event.type)
        pending.append(await publisher.publish(subject, encode_event(event), headers))
        count += 1
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return count
