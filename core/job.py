"""The job state machine: ``apply(state, event) -> state`` and its table of legal moves.

Pure: no clock, no randomness, no I/O. The sentinel uses it to decide, the projector to
build views and the replay tooling to rebuild them, so all three agree by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from core.events import Event

__all__ = [
    "JobState",
    "IllegalTransition",
    "TRANSITIONS",
    "TERMINAL",
    "ACTIVE",
    "apply",
    "fold",
]

NEW = "new"  # the state before a job's first event

# event type -> the states it may be applied in (the state it leads to is in _MUTATORS)
TRANSITIONS: dict[str, frozenset[str]] = {
    "submitted": frozenset({NEW}),
    "rejected": frozenset({NEW}),
    # from running: handed back by a draining worker; from dead_lettered: re-driven
    "queued": frozenset({"submitted", "retry_wait", "dead_lettered", "running"}),
    "started": frozenset({"queued"}),
    "progress": frozenset({"running"}),
    "succeeded": frozenset({"running"}),
    "failed": frozenset({"running"}),
    "timed_out": frozenset({"running", "queued"}),
    "retry_scheduled": frozenset({"failed", "timed_out"}),
    "dead_lettered": frozenset({"failed", "timed_out", "retry_wait", "queued"}),
    "cancel_requested": frozenset({"submitted", "queued", "running", "retry_wait", "failed",
                                   "timed_out"}),
    "cancelled": frozenset({"submitted", "queued", "running", "retry_wait", "failed",
                            "timed_out"}),
    "skipped": frozenset({NEW, "submitted", "queued"}),
}

TERMINAL = frozenset({"succeeded", "rejected", "dead_lettered", "cancelled", "skipped"})
ACTIVE = frozenset({"submitted", "queued", "running", "failed", "timed_out", "retry_wait"})


class IllegalTransition(ValueError):
    """An event that may not be applied in the job's current state."""

    def __init__(self, state: str, event_type: str, reason: str = "") -> None:
        why = reason or f"{event_type!r} is not allowed in state {state!r}"
        super().__init__(why)
        self.state = state
        self.event_type = event_type


@dataclass(frozen=True, slots=True)
class JobState:
    """Everything known about one job, derived from its events alone."""

    job_id: str
    state: str = NEW
    queue: str = ""
    handler: str = ""
    args: Any = None
    priority: int = 0
    max_attempts: int = 1
    timeout_s: float | None = None
    queue_timeout_s: float | None = None
    deadline_s: float | None = None
    retry: dict[str, float] | None = None
    correlation_id: str | None = None
    attempt: int = 0
    worker: str | None = None
    lease_s: float | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    last_seq: int = 0
    events: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


Mutator = Callable[[JobState, Event], JobState]


def apply(state: JobState, event: Event) -> JobState:
    """Return the state after ``event``; raise IllegalTransition if it may not happen."""
    allowed = TRANSITIONS.get(event.type)
    if allowed is None:
        raise IllegalTransition(state.state, event.type, f"unknown job event {event.type!r}")
    if state.state not in allowed:
        raise IllegalTransition(state.state, event.type)
    new = _MUTATORS[event.type](state, event)
    return replace(new, last_seq=max(event.seq, state.last_seq), events=state.events + 1)


def fold(events: Iterable[Event], job_id: str | None = None) -> JobState:
    """Apply events one after another from the empty state."""
    state: JobState | None = None
    for event in events:
        state = apply(state or JobState(job_id or event.id), event)
    if state is None:
        if job_id is None:
            raise ValueError("fold of no events needs a job_id")
        return JobState(job_id)
    return state


# -- one small function per event type --------------------------------------------------

def _submitted(s: JobState, e: Event) -> JobState:
    return replace(
        s, state="submitted", queue=e.data["queue"], handler=e.data["handler"],
        args=e.data["args"], priority=e.data["priority"], max_attempts=e.data["max_attempts"],
        timeout_s=e.get("timeout_s"), queue_timeout_s=e.get("queue_timeout_s"),
        deadline_s=e.get("deadline_s"), retry=e.get("retry"),
        correlation_id=e.get("correlation_id"), submitted_at=e.at,
    )


def _rejected(s: JobState, e: Event) -> JobState:
    error = {"type": "rejected", "code": e.data["code"], "message": e.data["reason"]}
    return replace(s, state="rejected", queue=e.get("queue", ""), error=error, finished_at=e.at,
                   submitted_at=e.at)


def _queued(s: JobState, e: Event) -> JobState:
    """Queued for the next attempt. A hand-back (from running) does not use up the budget;
    a re-drive (from dead_lettered) carries a new ``max_attempts``."""
    attempt = e.data["attempt"]
    if attempt != s.attempt + 1:
        raise IllegalTransition(s.state, "queued", f"queued attempt {attempt} after {s.attempt}")
    if s.state == "running" and not e.get("handback"):
        raise IllegalTransition(s.state, "queued", "only a hand-back re-queues a running job")
    budget = s.max_attempts + 1 if s.state == "running" else s.max_attempts
    if s.state == "dead_lettered":
        budget = int(e.get("max_attempts") or s.attempt + 1)
    return replace(s, state="queued", worker=None, not_before=None, finished_at=None,
                   max_attempts=budget)


def _started(s: JobState, e: Event) -> JobState:
    attempt = e.data["attempt"]
    if attempt != s.attempt + 1:
        raise IllegalTransition(s.state, "started", f"started attempt {attempt} after {s.attempt}")
    return replace(s, state="running", attempt=attempt, worker=e.data["worker"],
                   lease_s=e.data["lease_s"], started_at=e.at, error=None)


def _progress(s: JobState, e: Event) -> JobState:
    _same_attempt(s, e)
    return s


def _succeeded(s: JobState, e: Event) -> JobState:
    _same_attempt(s, e)
    return replace(s, state="succeeded", result=e.get("result"), finished_at=e.at)


def _failed(s: JobState, e: Event) -> JobState:
    _same_attempt(s, e)
    error = {k: e.data.get(k) for k in ("error_type", "message", "retryable", "exit_code")}
    return replace(s, state="failed", error=error, finished_at=e.at)


NOT_RETRYABLE_TIMEOUTS = frozenset({"queue", "deadline"})


def _timed_out(s: JobState, e: Event) -> JobState:
    kind = e.get("kind", "run")
    error = {"error_type": "timeout", "kind": kind, "message": e.data["reason"],
             "retryable": kind not in NOT_RETRYABLE_TIMEOUTS}
    return replace(s, state="timed_out", error=error, finished_at=e.at)


def _retry_scheduled(s: JobState, e: Event) -> JobState:
    return replace(s, state="retry_wait", not_before=e.data["not_before"])


def _dead_lettered(s: JobState, e: Event) -> JobState:
    return replace(s, state="dead_lettered", finished_at=e.at)


def _cancel_requested(s: JobState, e: Event) -> JobState:
    return replace(s, cancel_requested=True)


def _cancelled(s: JobState, e: Event) -> JobState:
    return replace(s, state="cancelled", finished_at=e.at)


def _skipped(s: JobState, e: Event) -> JobState:
    return replace(s, state="skipped", finished_at=e.at)


def _same_attempt(s: JobState, e: Event) -> None:
    if e.data["attempt"] != s.attempt:
        raise IllegalTransition(s.state, e.type,
                                f"{e.type} for attempt {e.data['attempt']}, running {s.attempt}")


_MUTATORS: dict[str, Mutator] = {
    "submitted": _submitted,
    "rejected": _rejected,
    "queued": _queued,
    "started": _started,
    "progress": _progress,
    "succeeded": _succeeded,
    "failed": _failed,
    "timed_out": _timed_out,
    "retry_scheduled": _retry_scheduled,
    "dead_lettered": _dead_lettered,
    "cancel_requested": _cancel_requested,
    "cancelled": _cancelled,
    "skipped": _skipped,
}
