"""The job state machine: ``apply(state, event) -> state`` and its table of legal moves.

Pure: no clock, no randomness, no I/O. The sentinel uses it to decide, the projector to
build views and the replay tooling to rebuild them, so all three agree by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

from jetflow.core.events import Event

__all__ = [
    "JobState",
    "NEW",
    "IllegalTransition",
    "TRANSITIONS",
    "TERMINAL",
    "ACTIVE",
    "apply",
    "step",
    "fold",
    "fold_skipping",
    "try_step",
    "as_fields",
    "from_fields",
]

NEW = "new"  # the state before a job's first event

# event type -> the states it may be applied in (the state it leads to is in _MUTATORS)
TRANSITIONS: dict[str, frozenset[str]] = {
    "submitted": frozenset({NEW}),
    "rejected": frozenset({NEW}),
    # from running: handed back by a draining worker; from dead_lettered: re-driven
    "queued": frozenset({"submitted", "retry_wait", "dead_lettered", "running"}),
    "started": frozenset({"queued"}),
    # a draining worker gives its running attempt back (v3; before, the worker appended a
    # ``queued`` with ``handback``, still read as it was)
    "handed_back": frozenset({"running"}),
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
    plugin: dict[str, Any] | None = None  # a plugin job: the version it runs, pinned
    input: str | None = None  # a plugin job's input path
    output: str | None = None  # ... and where its outputs go (None: the worker's default)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


Fields = dict[str, Any]  # a JobState's fields by name, in declaration order
Mutator = Callable[[Fields, Event], None]

_NAMES = tuple(f.name for f in fields(JobState))
_values = attrgetter(*_NAMES)


def as_fields(state: JobState) -> Fields:
    """A new dict of ``state``'s fields (what :func:`step` works on)."""
    return dict(zip(_NAMES, _values(state), strict=True))


def from_fields(values: Fields) -> JobState:
    return JobState(**values)


def apply(state: JobState, event: Event) -> JobState:
    """Return the state after ``event``; raise IllegalTransition if it may not happen."""
    values = as_fields(state)
    step(values, event)
    return from_fields(values)


def step(values: Fields, event: Event) -> None:
    """:func:`apply` on a field dict, in place: the fold path of the projector and the
    replay, which build no JobState per event. On any error ``values`` is left as it was
    (each mutator checks first, then makes one ``dict.update``)."""
    allowed = TRANSITIONS.get(event.type)
    if allowed is None:
        raise IllegalTransition(values["state"], event.type,
                                f"unknown job event {event.type!r}")
    if values["state"] not in allowed:
        raise IllegalTransition(values["state"], event.type)
    _MUTATORS[event.type](values, event)
    if event.seq > values["last_seq"]:
        values["last_seq"] = event.seq
    values["events"] += 1


def fold(events: Iterable[Event], job_id: str | None = None) -> JobState:
    """Apply events one after another from the empty state."""
    values: Fields | None = None
    for event in events:
        if values is None:
            values = as_fields(JobState(job_id or event.id))
        step(values, event)
    if values is None:
        if job_id is None:
            raise ValueError("fold of no events needs a job_id")
        return JobState(job_id)
    return from_fields(values)


def fold_skipping(events: Iterable[Event], job_id: str) -> tuple[JobState, dict[int, str]]:
    """Fold as the projector does: an event that may not happen (one published by hand,
    say) leaves the state as it was. Returns the state and, by stream sequence, why each
    skipped event was not applied."""
    values = as_fields(JobState(job_id))
    skipped: dict[int, str] = {}
    for event in events:
        refused = try_step(values, event)
        if refused is not None:
            skipped[event.seq] = refused[1]
    return from_fields(values), skipped


def try_step(values: Fields, event: Event) -> tuple[str, str] | None:
    """:func:`step`, or why the event was refused, as the projector records it:
    ``("illegal_transition", reason)``, or ``("apply_failed", reason)`` for a field of a
    hand-made event that a mutator chokes on. ``values`` is unchanged when refused."""
    try:
        step(values, event)
    except IllegalTransition as exc:
        return "illegal_transition", str(exc)
    except Exception as exc:  # noqa: BLE001 - a forged field: refused like any other
        return "apply_failed", f"{event.type}: {type(exc).__name__}: {exc}"
    return None


# -- one small function per event type: check, then one update ---------------------------

def _submitted(s: Fields, e: Event) -> None:
    """A new job; with ``"queued": true`` (v2) also queued for its first attempt, which
    the sentinel would otherwise record at once as a ``queued`` event of its own."""
    get = e.data.get
    s.update(
        state="queued" if get("queued") is True else "submitted", queue=e.data["queue"],
        handler=e.data["handler"],
        args=e.data["args"], priority=e.data["priority"], max_attempts=e.data["max_attempts"],
        timeout_s=get("timeout_s"), queue_timeout_s=get("queue_timeout_s"),
        deadline_s=get("deadline_s"), retry=get("retry"),
        correlation_id=get("correlation_id"), submitted_at=e.at,
        plugin=get("plugin"), input=get("input"), output=get("output"),
    )


def _rejected(s: Fields, e: Event) -> None:
    error = {"type": "rejected", "code": e.data["code"], "message": e.data["reason"]}
    handler = e.data.get("handler")  # the one a readable body named, if any
    s.update(state="rejected", queue=e.data.get("queue", ""), error=error, finished_at=e.at,
             submitted_at=e.at, handler=handler if isinstance(handler, str) else "")


def _queued(s: Fields, e: Event) -> None:
    """Queued for the next attempt. A hand-back (from running) does not use up the budget;
    a re-drive (from dead_lettered) carries a new ``max_attempts``."""
    attempt, state = e.data["attempt"], s["state"]
    if attempt != s["attempt"] + 1:
        raise IllegalTransition(state, "queued", f"queued attempt {attempt} after "
                                                 f"{s['attempt']}")
    if state == "running" and not e.data.get("handback"):
        raise IllegalTransition(state, "queued", "only a hand-back re-queues a running job")
    budget = s["max_attempts"] + 1 if state == "running" else s["max_attempts"]
    if state == "dead_lettered":
        budget = int(e.data.get("max_attempts") or s["attempt"] + 1)
    s.update(state="queued", worker=None, not_before=None, finished_at=None,
             max_attempts=budget)


def _started(s: Fields, e: Event) -> None:
    attempt = e.data["attempt"]
    if attempt != s["attempt"] + 1:
        raise IllegalTransition(s["state"], "started",
                                f"started attempt {attempt} after {s['attempt']}")
    s.update(state="running", attempt=attempt, worker=e.data["worker"],
             lease_s=e.data["lease_s"], started_at=e.at, error=None)


def _progress(s: Fields, e: Event) -> None:
    _same_attempt(s, e)


def _handed_back(s: Fields, e: Event) -> None:
    """Queued again for the next attempt, which does not use up the budget."""
    _same_attempt(s, e)
    s.update(state="queued", worker=None, not_before=None, finished_at=None,
             max_attempts=s["max_attempts"] + 1)


def _succeeded(s: Fields, e: Event) -> None:
    _same_attempt(s, e)
    s.update(state="succeeded", result=e.data.get("result"), finished_at=e.at)


def _failed(s: Fields, e: Event) -> None:
    _same_attempt(s, e)
    error = {k: e.data.get(k) for k in ("error_type", "message", "retryable", "exit_code")}
    s.update(state="failed", error=error, finished_at=e.at)


NOT_RETRYABLE_TIMEOUTS = frozenset({"queue", "deadline"})


def _timed_out(s: Fields, e: Event) -> None:
    if e.data.get("worker") is not None:  # a worker's own run: the holder's
        _same_attempt(s, e)
    kind = e.data.get("kind", "run")
    error = {"error_type": "timeout", "kind": kind, "message": e.data["reason"],
             "retryable": kind not in NOT_RETRYABLE_TIMEOUTS}
    s.update(state="timed_out", error=error, finished_at=e.at)


def _retry_scheduled(s: Fields, e: Event) -> None:
    s.update(state="retry_wait", not_before=e.data["not_before"])


def _dead_lettered(s: Fields, e: Event) -> None:
    s.update(state="dead_lettered", finished_at=e.at)


def _cancel_requested(s: Fields, e: Event) -> None:
    s["cancel_requested"] = True


def _cancelled(s: Fields, e: Event) -> None:
    s.update(state="cancelled", finished_at=e.at)


def _skipped(s: Fields, e: Event) -> None:
    s.update(state="skipped", finished_at=e.at)


def _same_attempt(s: Fields, e: Event) -> None:
    """An event of the running attempt, from the worker that holds its claim (one that
    names no worker is from a log older than that check)."""
    if e.data["attempt"] != s["attempt"]:
        raise IllegalTransition(s["state"], e.type,
                                f"{e.type} for attempt {e.data['attempt']}, "
                                f"running {s['attempt']}")
    worker = e.data.get("worker")
    if worker is not None and worker != s["worker"]:
        raise IllegalTransition(s["state"], e.type,
                                f"{e.type} from worker {worker}, which does not hold the "
                                f"claim (worker {s['worker']} does)")


_MUTATORS: dict[str, Mutator] = {
    "submitted": _submitted,
    "rejected": _rejected,
    "queued": _queued,
    "started": _started,
    "progress": _progress,
    "handed_back": _handed_back,
    "succeeded": _succeeded,
    "failed": _failed,
    "timed_out": _timed_out,
    "retry_scheduled": _retry_scheduled,
    "dead_lettered": _dead_lettered,
    "cancel_requested": _cancel_requested,
    "cancelled": _cancelled,
    "skipped": _skipped,
}
