"""Every stream, subject, consumer and header name jetflow uses, in one place.

Nothing else in the project builds a subject string by hand: it calls a builder here,
and the builders refuse tokens that would change a subject's meaning (``.``, ``*``,
``>`` or whitespace inside an id).
"""

from __future__ import annotations

import re

__all__ = [
    "EVENTS_STREAM",
    "SUBMIT_STREAM",
    "RETIRED_WORK_STREAM",
    "SNAPSHOT_BUCKET",
    "SENTINEL_SNAPSHOT",
    "TEMPLATE_BUCKET",
    "PLUGIN_BUCKET",
    "LOGS_STREAM",
    "HEARTBEAT_STREAM",
    "EVENTS_SUBJECTS",
    "InvalidToken",
    "check_token",
    "event_subject",
    "entity_filter",
    "job_subject",
    "job_filter",
    "worker_subject",
    "submit_subject",
    "work_subject",
    "work_ack_prefix",
    "work_acks_of",
    "work_acks_for",
    "log_subject",
    "heartbeat_subject",
    "parse_event_subject",
    "queue_of_submit_subject",
]

# -- streams -------------------------------------------------------------------------
EVENTS_STREAM = "JF_EVENTS"
SUBMIT_STREAM = "JF_SUBMIT"
RETIRED_WORK_STREAM = "JF_WORK"  # offers were stored here once (see bus.ensure_streams)
LOGS_STREAM = "JF_LOGS"
HEARTBEAT_STREAM = "JF_HEARTBEATS"
SNAPSHOT_BUCKET = "JF_SNAPSHOTS"  # object store: the sentinel's snapshot of what it knows
SENTINEL_SNAPSHOT = "sentinel"  # its object
TEMPLATE_BUCKET = "JF_TEMPLATES"  # object store: workflow templates, "<name>/<version>"
PLUGIN_BUCKET = "JF_PLUGINS"  # object store: plugin sources, "<name>/<version>"

PREFIX = "jf"
EVENT_KINDS = ("job", "wf", "worker", "plugin")
EVENTS_SUBJECTS = [f"{PREFIX}.{kind}.>" for kind in EVENT_KINDS]
SUBMIT_SUBJECTS = [f"{PREFIX}.submit.>"]
WORK_SUBJECTS = [f"{PREFIX}.work.>"]  # offers to workers: core NATS, not stored
LOGS_SUBJECTS = [f"{PREFIX}.log.>"]
HEARTBEAT_SUBJECTS = [f"{PREFIX}.hb.>"]
SUBMIT_WILDCARD = f"{PREFIX}.submit.>"
CONTROL_CANCEL = f"{PREFIX}.ctl.cancel"  # {"job_id", "reason"?} -> cancel_requested
CONTROL_WF_CANCEL = f"{PREFIX}.ctl.wf.cancel"  # {"workflow_id", "reason"?} -> cancel_requested
CONTROL_RETRY = f"{PREFIX}.ctl.retry"  # {"job_id", "attempts"?} -> a dead letter re-driven
SENTINEL_PING = f"{PREFIX}.ctl.sentinel.ping"  # answered by a sentinel that is ready
# answered by every projector: {"db", "host", "pid", "seq"} (where its file is)
PROJECTOR_WHERE = f"{PREFIX}.ctl.projector.where"
# answered by a secured `jetflow up` (admin only): a new worker identity of its own
LOCAL_WORKER = f"{PREFIX}.up.worker"

# -- consumers -----------------------------------------------------------------------
SENTINEL_SUBMIT_CONSUMER = "jf-sentinel-submit"
SENTINEL_REPLY_GROUP = "jf-sentinel"
PROJECTOR_NAME = "jf-projector"

# -- headers -------------------------------------------------------------------------
HDR_MSG_ID = "Nats-Msg-Id"
HDR_EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
HDR_TRACEPARENT = "traceparent"
HDR_TRACESTATE = "tracestate"
HDR_CORRELATION_ID = "Jf-Correlation-Id"

# -- tokens --------------------------------------------------------------------------
_TOKEN = re.compile(r"^[A-Za-z0-9_\-:]{1,128}\Z")  # \Z: "$" would accept a trailing "\n"


class InvalidToken(ValueError):
    """A value that cannot be used as one token of a NATS subject."""


JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" would accept a trailing "\n"
JOB_ID_RULE = "1-64 characters of A-Z a-z 0-9 _ -"


def job_id_problem(value: object) -> str | None:
    """Why ``value`` cannot be a job id (the one rule, for submissions and reads alike),
    or None."""
    if isinstance(value, str) and JOB_ID_RE.match(value):
        return None
    return f"invalid job id {value!r}: a job id is {JOB_ID_RULE}"


def check_job_id(value: object) -> str:
    """``value`` if it can be a job id, else :class:`InvalidToken` saying the rule."""
    problem = job_id_problem(value)
    if problem:
        raise InvalidToken(problem)
    assert isinstance(value, str)
    return value


def check_token(value: object, what: str = "token") -> str:
    """Return ``value`` if it is safe as a single subject token, else raise InvalidToken."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InvalidToken(
            f"invalid {what} {value!r}: use 1-128 of A-Z a-z 0-9 _ - : "
            "(no '.', '*', '>' or whitespace)"
        )
    return value


def event_subject(kind: str, id_: str, event_type: str) -> str:
    if kind not in EVENT_KINDS:
        raise InvalidToken(f"unknown event kind {kind!r}")
    return f"{PREFIX}.{kind}.{check_token(id_, kind + ' id')}.{check_token(event_type)}"


def entity_filter(kind: str, id_: str) -> str:
    """All of one entity's events: the subject filter of expected-sequence appends."""
    if kind not in EVENT_KINDS:
        raise InvalidToken(f"unknown event kind {kind!r}")
    return f"{PREFIX}.{kind}.{check_token(id_, kind + ' id')}.*"


def job_subject(job_id: str, event_type: str) -> str:
    return f"{PREFIX}.job.{check_token(job_id, 'job id')}.{check_token(event_type, 'event type')}"


def job_filter(job_id: str) -> str:
    """The subject filter of all of one job's events (for expected-sequence appends)."""
    return f"{PREFIX}.job.{check_token(job_id, 'job id')}.*"


def worker_subject(worker_id: str, event_type: str) -> str:
    return f"{PREFIX}.worker.{check_token(worker_id, 'worker id')}.{check_token(event_type)}"


def submit_subject(queue: str) -> str:
    return f"{PREFIX}.submit.{check_token(queue, 'queue')}"


def work_subject(worker_id: str) -> str:
    return f"{PREFIX}.work.{check_token(worker_id, 'worker id')}"


def work_ack_prefix(worker_id: str, sentinel_id: str) -> str:
    """Where the acks of the ``submitted`` appends of the jobs a sentinel offers the worker
    early come (a token each): the worker and the sentinel learn the sequence the claim
    must expect from the same ack."""
    return f"{work_subject(worker_id)}.ack.{check_token(sentinel_id, 'sentinel id')}"


def work_acks_of(worker_id: str) -> str:
    """The early acks for a worker (see :func:`work_ack_prefix`), from any sentinel."""
    return f"{work_subject(worker_id)}.ack.>"


def work_acks_for(sentinel_id: str) -> str:
    """The early acks of one sentinel's appends, for any worker."""
    return f"{PREFIX}.work.*.ack.{check_token(sentinel_id, 'sentinel id')}.*"


def log_subject(job_id: str, attempt: int) -> str:
    return f"{PREFIX}.log.{check_token(job_id, 'job id')}.{int(attempt)}"


def log_filter(job_id: str) -> str:
    return f"{PREFIX}.log.{check_token(job_id, 'job id')}.*"


def heartbeat_subject(worker_id: str) -> str:
    return f"{PREFIX}.hb.{check_token(worker_id, 'worker id')}"


def parse_event_subject(subject: str) -> tuple[str, str, str] | None:
    """``jf.<kind>.<id>.<type>`` -> (kind, id, type); None for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] not in EVENT_KINDS:
        return None
    return parts[1], parts[2], parts[3]


def queue_of_submit_subject(subject: str) -> str | None:
    """``jf.submit.<queue>`` -> queue; None when the subject has another shape."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or parts[1] != "submit":
        return None
    return parts[2] if _TOKEN.match(parts[2]) else None
