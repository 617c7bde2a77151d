"""How one batch of events changes the views: pure functions from events (and the prior
job states) to rows. No clock, no randomness: the same events always give the same rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.codec import CodecError, decode_event
from core.events import Event
from core.job import IllegalTransition, JobState, apply

__all__ = ["BatchRows", "fold_batch", "job_row", "state_from_json"]

StateLoader = Callable[[str], JobState | None]


@dataclass
class BatchRows:
    jobs: dict[str, JobState] = field(default_factory=dict)
    timeline: list[tuple[int, str, str, str, float, str]] = field(default_factory=list)
    workers: list[Event] = field(default_factory=list)
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)
    last_seq: int = 0


def fold_batch(messages: list[tuple[int, str, bytes]], load: StateLoader) -> BatchRows:
    """``messages`` are (seq, subject, data); ``load`` gives a job's state before the batch."""
    rows = BatchRows()
    for seq, subject, data in messages:
        rows.last_seq = max(rows.last_seq, seq)
        try:
            event = decode_event(subject, data, seq)
        except CodecError as exc:
            rows.errors.append((seq, subject, f"{exc.code}: {exc.message}",
                                data[:2000].decode("utf-8", errors="replace")))
            continue
        reason = _apply(rows, event, load)
        if reason:
            rows.errors.append((seq, subject, reason, data[:2000].decode("utf-8", "replace")))
            continue
        rows.timeline.append((seq, event.kind, event.id, event.type, event.at,
                              json.dumps(event.data)))
    return rows


def _apply(rows: BatchRows, event: Event, load: StateLoader) -> str | None:
    if event.kind == "worker":
        rows.workers.append(event)
        return None
    if event.kind != "job":
        return None
    before = rows.jobs.get(event.id) or load(event.id) or JobState(event.id)
    try:
        rows.jobs[event.id] = apply(before, event)
    except IllegalTransition as exc:
        return f"illegal_transition: {exc}"
    return None


def job_row(s: JobState) -> tuple[Any, ...]:
    return (s.job_id, s.queue, s.handler, s.priority, s.state, s.attempt, s.max_attempts,
            s.worker, s.correlation_id, s.submitted_at, s.started_at, s.finished_at,
            _json_or_none(s.result), _json_or_none(s.error), s.last_seq,
            json.dumps(asdict(s)))


def state_from_json(text: str) -> JobState:
    return JobState(**json.loads(text))


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)
