"""Human-readable rendering of jobs and their histories (CLI and demo)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from core.events import Event
from core.job import JobState

__all__ = ["job_lines", "job_json"]

_HIDDEN = ("fp", "traceback", "args", "body")


def job_lines(job: JobState, events: Sequence[Event]) -> list[str]:
    lines = [f"job {job.job_id}: {job.state}  handler={job.handler or '-'} "
             f"queue={job.queue or '-'} priority={job.priority} "
             f"attempt={job.attempt}/{job.max_attempts}"]
    if job.result is not None:
        lines.append(f"  result: {json.dumps(job.result)}")
    if job.error:
        lines.append(f"  error: {job.error.get('error_type') or job.error.get('type', '')}: "
                     f"{job.error.get('message', '')}")
    t0 = events[0].at if events else 0.0
    for e in events:
        detail = {k: v for k, v in e.data.items() if k not in _HIDDEN and v is not None}
        lines.append(f"  {e.seq:>7}  +{(e.at - t0) * 1000:9.1f} ms  {e.type:<16} "
                     f"{json.dumps(detail)[:160]}")
    return lines


def job_json(job: JobState, events: Sequence[Event]) -> dict[str, Any]:
    return {"job_id": job.job_id, "state": job.state, "attempt": job.attempt,
            "handler": job.handler, "queue": job.queue, "priority": job.priority,
            "correlation_id": job.correlation_id, "worker": job.worker,
            "result": job.result, "error": job.error,
            "events": [{"seq": e.seq, "type": e.type, "at": e.at, "data": e.data}
                       for e in events]}
