"""Human-readable rendering of jobs and their histories (CLI and demo)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from jetflow.core.codec import Unreadable
from jetflow.core.events import Event
from jetflow.core.job import JobState

__all__ = ["job_lines", "job_json"]

_HIDDEN = ("fp", "traceback", "args", "body")
_DETAIL_CHARS = 160
_NOT_APPLIED = ("illegal_transition", "apply_failed")  # the projector's codes for a valid
# event the state machine refused


def job_lines(job: JobState, events: Sequence[Event], skipped: Mapping[int, str] | None = None,
              unreadable: Sequence[Unreadable] = ()) -> list[str]:
    """The job's summary, then one line per event; an event the state machine did not
    apply (``skipped``, by seq) and a message that is no event (``unreadable``) are shown
    in their place in the log, marked as such."""
    lines = [f"job {job.job_id}: {job.state}  handler={job.handler or '-'} "
             f"queue={job.queue or '-'} priority={job.priority} "
             f"attempt={job.attempt}/{job.max_attempts}"]
    outputs = job.result.get("outputs") if isinstance(job.result, dict) else None
    if isinstance(outputs, list) and all(isinstance(o, dict) for o in outputs):
        lines += [_output_line(o) for o in outputs]  # a plugin job's: one line each
    elif job.result is not None:
        lines.append(f"  result: {json.dumps(job.result)}")
    if job.error:
        lines.append(f"  error: {job.error.get('error_type') or job.error.get('type', '')}: "
                     f"{job.error.get('message', '')}")
    skipped = skipped or {}
    t0 = events[0].at if events else 0.0
    rows: list[tuple[int, str]] = []
    for e in events:
        detail = json.dumps({k: v for k, v in e.data.items()
                             if k not in _HIDDEN and v is not None})
        if len(detail) > _DETAIL_CHARS:
            detail = detail[:_DETAIL_CHARS - 1] + "\u2026"
        line = f"  {e.seq:>7}  +{(e.at - t0) * 1000:9.1f} ms  {e.type:<16} {detail}"
        if e.seq in skipped:
            line += f"  [not applied: {skipped[e.seq]}]"
        rows.append((e.seq, line))
    for u in unreadable:  # from the projection, an event it did not apply is one of these
        label = "(not applied)" if u.code in _NOT_APPLIED else "(unreadable)"
        rows.append((u.seq, f"  {u.seq:>7}  {'':>12}  {label:<16} "
                            f"{u.subject}: {u.code}: {u.reason}"))
    lines += [line for _seq, line in sorted(rows)]
    return lines


def job_json(job: JobState, events: Sequence[Event], skipped: Mapping[int, str] | None = None,
             unreadable: Sequence[Unreadable] = ()) -> dict[str, Any]:
    skipped = skipped or {}
    out = {"job_id": job.job_id, "state": job.state, "attempt": job.attempt,
           "handler": job.handler, "queue": job.queue, "priority": job.priority,
           "correlation_id": job.correlation_id, "worker": job.worker,
           "result": job.result, "error": job.error,
           "events": [{"seq": e.seq, "type": e.type, "at": e.at, "data": e.data,
                       **({"not_applied": skipped[e.seq]} if e.seq in skipped else {})}
                      for e in events]}
    if unreadable:
        out["unreadable"] = [u._asdict() for u in unreadable]
    return out


def _output_line(o: dict[str, Any]) -> str:
    """One output of a plugin job: its rows, quarantined rows, size, digest and where."""
    quarantined = f" ({o.get('quarantined')} quarantined)" if o.get("quarantined") else ""
    digest = str(o.get("sha256") or "")[:12]
    return (f"  output {o.get('name')}: {o.get('rows')} rows{quarantined}, "
            f"{o.get('bytes') or 0:,} bytes, sha256 {digest or '-'}, {o.get('uri') or '-'}")
