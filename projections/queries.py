"""The questions the read commands ask a projection file, as plain dicts (the ``--json``
shapes). Times are the events' own; "age" is measured at the latest event applied, so a
time-travel replay answers as of its own moment."""

from __future__ import annotations

from typing import Any

import aiosqlite

from jetflow.core.codec import Unreadable, loads
from jetflow.core.events import Event
from jetflow.core.job import JobState

__all__ = [
    "as_of",
    "queue_view",
    "worker_view",
    "worker_status",
    "list_jobs",
    "job_from_projection",
    "job_errors",
    "list_errors",
    "STATE_ORDER",
]

# The order the state columns are shown in; unknown states come after, alphabetically.
STATE_ORDER = ("submitted", "queued", "running", "failed", "timed_out", "retry_wait",
               "succeeded", "dead_lettered", "cancelled", "rejected", "skipped")

_JOB_COLUMNS = ("job_id", "queue", "handler", "priority", "state", "attempt", "max_attempts",
                "worker", "correlation_id", "trace_id", "submitted_at", "queued_at",
                "started_at", "finished_at", "result", "error", "last_seq")


async def _all(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()
               ) -> list[tuple[Any, ...]]:
    async with db.execute(sql, params) as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def as_of(db: aiosqlite.Connection) -> dict[str, Any]:
    """The projection's position: the last stream sequence and event time applied, and
    whether the file is a replay's snapshot (see :meth:`Store.mark_snapshot`)."""
    rows = await _all(db, "SELECT last_seq, last_at FROM checkpoint WHERE id = 1")
    seq, at = rows[0] if rows else (0, None)
    errors = (await _all(db, "SELECT count(*) FROM projection_errors"))[0][0]
    snapshot = bool((await _all(db, "PRAGMA user_version"))[0][0])
    return {"seq": seq, "at": at, "projection_errors": errors, "snapshot": snapshot}


async def queue_view(db: aiosqlite.Connection, *, minutes: int = 5) -> dict[str, Any]:
    """Per queue: jobs by state, queued jobs by priority, the oldest queued job and its
    age, and outcomes per minute over the last ``minutes`` minutes of event time."""
    position = await as_of(db)
    now = position["at"]
    queues: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return queues.setdefault(name, {"queue": name, "states": {}, "total": 0,
                                        "depth": {}, "oldest_queued": None,
                                        "per_minute": []})

    for queue, state, n in await _all(db, "SELECT queue, state, jobs FROM queue_states"):
        q = entry(queue)
        q["states"][state] = n
        q["total"] += n
    for queue, priority, n in await _all(
            db, "SELECT queue, priority, jobs FROM queue_depth ORDER BY priority DESC"):
        entry(queue)["depth"][str(priority)] = n
    for queue, job_id, queued_at in await _all(
            db, "SELECT queue, job_id, min(queued_at) FROM jobs WHERE state = 'queued' "
                "GROUP BY queue"):
        age = None if now is None or queued_at is None else max(0.0, now - queued_at)
        entry(queue)["oldest_queued"] = {"job_id": job_id, "queued_at": queued_at,
                                         "age_s": age}
    await _per_minute(db, queues, now, minutes)
    return {"as_of": position, "window_minutes": minutes,
            "queues": [queues[name] for name in sorted(queues)]}


async def _per_minute(db: aiosqlite.Connection, queues: dict[str, dict[str, Any]],
                      now: float | None, minutes: int) -> None:
    if now is None:
        return
    last = int(now // 60)
    window = range(last - minutes + 1, last + 1)
    counts: dict[tuple[str, int], tuple[int, int, int]] = {}
    for queue, minute, s, f, d in await _all(
            db, "SELECT queue, minute, succeeded, failed, dead_lettered FROM throughput "
                "WHERE minute BETWEEN ? AND ?", (window.start, window.stop - 1)):
        counts[(queue, minute)] = (s, f, d)
    for name, q in queues.items():
        for minute in window:
            s, f, d = counts.get((name, minute), (0, 0, 0))
            q["per_minute"].append({"minute_start": minute * 60, "succeeded": s,
                                    "failed": f, "dead_lettered": d})


def worker_status(stored: str, running: int, draining: bool | None = None) -> str:
    """idle / busy / draining for a live worker; lost / stopped as recorded."""
    if stored != "live":
        return stored
    if draining:
        return "draining"
    return "busy" if running else "idle"


async def worker_view(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    """Every worker the log knows, with the jobs it is running now."""
    current: dict[str, list[str]] = {}
    for worker, job_id in await _all(
            db, "SELECT worker, job_id FROM jobs WHERE state = 'running' ORDER BY job_id"):
        current.setdefault(worker, []).append(job_id)
    out = []
    for row in await _all(db, "SELECT worker_id, host, pid, handlers, queues, concurrency, "
                              "status, joined_at, left_at, reason, succeeded, failed "
                              "FROM workers ORDER BY joined_at, worker_id"):
        (worker_id, host, pid, handlers, queues, concurrency, status, joined_at, left_at,
         reason, succeeded, failed) = row
        jobs = current.get(worker_id, [])
        out.append({"worker_id": worker_id, "host": host, "pid": pid,
                    "handlers": _split(handlers), "queues": _split(queues),
                    "concurrency": concurrency, "recorded_status": status,
                    "status": worker_status(status, len(jobs)), "current_jobs": jobs,
                    "joined_at": joined_at, "left_at": left_at, "reason": reason,
                    "succeeded": succeeded, "failed": failed, "last_heartbeat": None})
    return out


def _split(text: str | None) -> list[str]:
    return [part for part in (text or "").split(",") if part]


async def list_jobs(db: aiosqlite.Connection, *, state: str | None = None,
                    queue: str | None = None, handler: str | None = None,
                    limit: int = 50) -> list[dict[str, Any]]:
    """Jobs matching every filter given, the most recently changed first."""
    clauses, params = [], []
    for column, value in (("state", state), ("queue", queue), ("handler", handler)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = (f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs{where} "
           "ORDER BY last_seq DESC LIMIT ?")
    rows = await _all(db, sql, (*params, limit))
    jobs = [dict(zip(_JOB_COLUMNS, row, strict=True)) for row in rows]
    for job in jobs:
        job["error"] = loads(job["error"]) if job["error"] else None
    return jobs


async def job_from_projection(db: aiosqlite.Connection, job_id: str
                              ) -> tuple[JobState, list[Event], str | None] | None:
    """(state, events, trace id) of one job, or None if the projection does not have it."""
    rows = await _all(db, "SELECT state_json, trace_id FROM jobs WHERE job_id = ?", (job_id,))
    if not rows:
        return None
    state = JobState(**loads(rows[0][0]))
    events = [_event(job_id, *row) for row in await _all(
        db, "SELECT seq, type, at, body FROM timeline WHERE entity_id = ? AND kind = 'job' "
            "ORDER BY seq", (job_id,))]
    return state, events, rows[0][1]


async def job_errors(db: aiosqlite.Connection, job_id: str) -> list[Unreadable]:
    """The projection errors recorded for messages on the job's subjects."""
    rows = await _all(db, "SELECT seq, subject, code, reason FROM projection_errors "
                          "WHERE subject GLOB ? ORDER BY seq", (f"jf.job.{job_id}.*",))
    return [Unreadable(*row) for row in rows]


async def list_errors(db: aiosqlite.Connection, *, limit: int = 50) -> list[dict[str, Any]]:
    """The latest projection errors: messages the projector could not apply."""
    rows = await _all(db, "SELECT seq, subject, code, reason, raw FROM projection_errors "
                          "ORDER BY seq DESC LIMIT ?", (limit,))
    return [dict(zip(("seq", "subject", "code", "reason", "raw"), row, strict=True))
            for row in rows]


def _event(job_id: str, seq: int, type_: str, at: float, body: str) -> Event:
    data = loads(body).get("data") or {}
    return Event("job", job_id, type_, at, data, seq=seq)
