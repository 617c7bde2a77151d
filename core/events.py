"""Event types: the vocabulary of the log.

Every transition is one :class:`Event`, stored on ``jf.<kind>.<id>.<type>`` with the
envelope ``{"type", "<kind>_id", "v", "at", "data"}``. The envelope is the public contract;
``data`` holds the fields of the type, listed in :data:`FIELDS` (required fields only:
optional ones may be added in a later version without breaking replay).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Event",
    "stored_event",
    "JOB_EVENTS",
    "WORKER_EVENTS",
    "FIELDS",
    "SCHEMA_VERSION",
]

# v2: a ``submitted`` event may carry ``"queued": true`` (queued for attempt 1 with it,
# no ``queued`` event of its own); a v1 event reads as it always did.
SCHEMA_VERSION = 2

# Job events and the data fields each one must carry (name -> accepted python types).
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_DICT = (dict,)
_LIST = (list,)

JOB_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "submitted": {
        "queue": _STR, "handler": _STR, "args": _DICT, "priority": _INT,
        "max_attempts": _INT,
    },
    "rejected": {"reason": _STR, "code": _STR},
    "queued": {"attempt": _INT},
    "started": {"attempt": _INT, "worker": _STR, "lease_s": _NUM},
    "progress": {"attempt": _INT},
    "handed_back": {"attempt": _INT, "worker": _STR},
    "succeeded": {"attempt": _INT, "worker": _STR},
    "failed": {"attempt": _INT, "error_type": _STR, "message": _STR, "retryable": _BOOL},
    "retry_scheduled": {"attempt": _INT, "not_before": _NUM},
    "timed_out": {"attempt": _INT, "reason": _STR},
    "dead_lettered": {"reason": _STR},
    "cancel_requested": {},
    "cancelled": {"reason": _STR},
    "skipped": {"reason": _STR},
}

WORKER_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "joined": {"handlers": _LIST, "queues": _LIST, "concurrency": _INT},
    "lost": {"reason": _STR},
    "left": {"reason": _STR},
}

# Workflow events (jf.wf.<workflow_id>.<type>), and a template's registration
# (jf.wf.t:<template name>.registered: "t:" cannot begin a workflow id).
WF_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "started": {"template": _STR, "version": _INT, "sha256": _STR},
    "step_failed": {"step": _STR},
    "cancel_requested": {},
    "succeeded": {},
    "failed": {"reason": _STR},
    "cancelled": {},
    "registered": {"name": _STR, "version": _INT, "sha256": _STR, "steps": _INT},
}

# Plugin events (jf.plugin.<name>.<type>): a version deployed (made active), activated
# again (a rollback), retired.
PLUGIN_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "deployed": {"version": _STR, "sha256": _STR},
    "activated": {"version": _STR},
    "retired": {"version": _STR},
    "env_ready": {"version": _STR, "worker": _STR},  # a worker built its environment
    "env_failed": {"version": _STR, "worker": _STR, "error": _STR},
}

FIELDS: dict[str, dict[str, dict[str, tuple[type, ...]]]] = {
    "job": JOB_FIELDS,
    "worker": WORKER_FIELDS,
    "wf": WF_FIELDS,
    "plugin": PLUGIN_FIELDS,
}

JOB_EVENTS = frozenset(JOB_FIELDS)
WORKER_EVENTS = frozenset(WORKER_FIELDS)


@dataclass(frozen=True, slots=True)
class Event:
    """One immutable transition.

    ``kind`` is the entity ("job", "worker", "wf", "plugin"), ``id`` its id, ``type`` the
    transition, ``at`` the actor's clock in Unix seconds, ``data`` the type's fields.
    ``seq`` is the JF_EVENTS stream sequence once stored (0 before).
    """

    kind: str
    id: str
    type: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)
    v: int = SCHEMA_VERSION
    seq: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


_new = object.__new__
_SET = tuple(Event.__dict__[name].__set__ for name in ("kind", "id", "type", "at", "data", "v",
                                                          "seq"))


def stored_event(kind: str, id_: str, type_: str, at: float, data: dict[str, Any], v: int,
                 seq: int) -> Event:
    """``Event(kind, id_, type_, at, data, v, seq)`` for the codec, which builds one per
    stored event: set through the slots, as the frozen dataclass's ``__init__`` does with
    ``object.__setattr__`` per field, at half the cost. (A test checks they agree.)"""
    set_kind, set_id, set_type, set_at, set_data, set_v, set_seq = _SET
    event = _new(Event)
    set_kind(event, kind)
    set_id(event, id_)
    set_type(event, type_)
    set_at(event, at)
    set_data(event, data)
    set_v(event, v)
    set_seq(event, seq)
    return event


def job_event(job_id: str, type_: str, at: float, **data: Any) -> Event:
    """Build a job event (a convenience for the services and tests)."""
    return Event("job", job_id, type_, at, data)


def worker_event(worker_id: str, type_: str, at: float, **data: Any) -> Event:
    return Event("worker", worker_id, type_, at, data)
