"""Validation of raw, untrusted submission bodies, and deterministic job ids.

A submission arrives on ``jf.submit.<queue>`` from anybody (``nats pub``, the CLI, the
client). :func:`parse_submission` turns the bytes into a :class:`Submission` or raises
:class:`~jetflow.core.codec.CodecError` with a reason that the sentinel records verbatim in a
``rejected`` event.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from jetflow.core.codec import CodecError, loads
from jetflow.core.subjects import HDR_MSG_ID, JOB_ID_RE, job_id_problem

__all__ = [
    "Submission",
    "parse_submission",
    "check_handler_known",
    "derive_job_id",
    "submission_fingerprint",
    "header_problem",
    "differing_fields",
    "WorkflowStart",
    "parse_workflow_start",
    "MAX_SUBMISSION_BYTES",
    "MAX_ARGS_DEPTH",
    "JOB_ID_RE",
]

MAX_SUBMISSION_BYTES = 256 * 1024
MAX_ARGS_DEPTH = 32  # nesting of a job's args or a workflow's context
HANDLER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT_S = 7 * 24 * 3600.0

_FIELDS = frozenset({"handler", "args", "priority", "job_id", "max_attempts", "timeout_s",
                     "queue_timeout_s", "deadline_s", "retry", "correlation_id", "workflow",
                     "input", "output"})
_RETRY_FIELDS = {"base_s": (0.0, 3600.0), "factor": (1.0, 10.0), "cap_s": (0.0, 86400.0),
                 "jitter": (0.0, 1.0)}


@dataclass(frozen=True, slots=True)
class Submission:
    """A validated submission, before the sentinel has given it an id and a place."""

    queue: str
    handler: str
    args: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    job_id: str | None = None
    max_attempts: int = 3
    timeout_s: float | None = None
    queue_timeout_s: float | None = None
    deadline_s: float | None = None
    retry: dict[str, float] | None = None
    correlation_id: str | None = None
    input: str | None = None  # a plugin job's input file
    output: str | None = None  # ... and its output directory


def parse_submission(raw: bytes, queue: str, *, max_bytes: int = MAX_SUBMISSION_BYTES,
                     default_max_attempts: int = 3) -> Submission:
    """Validate a raw submission body; raise CodecError naming the first problem."""
    if len(raw) > max_bytes:
        raise CodecError("too_large", f"submission is {len(raw)} bytes, over the limit of "
                                      f"{max_bytes}")
    body = loads(raw)
    if not isinstance(body, dict):
        raise CodecError("not_object", f"submission must be a JSON object, got "
                                       f"{type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise CodecError("unknown_field", f"unknown field(s): {', '.join(unknown)}; allowed: "
                                          f"{', '.join(sorted(_FIELDS))}")
    if "workflow" in body:
        raise CodecError("is_workflow", "a workflow start, not a job: parse_workflow_start")
    return Submission(
        queue=queue,
        handler=_handler(body),
        args=_args(body),
        priority=_int_field(body, "priority", 0, 0, 9),
        job_id=_job_id(body),
        max_attempts=_int_field(body, "max_attempts", default_max_attempts, 1,
                                MAX_ATTEMPTS_LIMIT),
        timeout_s=_seconds(body, "timeout_s"),
        queue_timeout_s=_seconds(body, "queue_timeout_s"),
        deadline_s=_seconds(body, "deadline_s"),
        retry=_retry(body),
        correlation_id=_correlation_id(body),
        input=_path(body, "input"),
        output=_path(body, "output"),
    )


def _path(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 4096 or "\0" in value:
        raise CodecError("bad_field", f"{key!r} must be a path (1-4096 characters)")
    return value


@dataclass(frozen=True, slots=True)
class WorkflowStart:
    """A validated request to start a workflow."""

    queue: str
    workflow: str
    version: int | None
    context: Any
    workflow_id: str | None
    correlation_id: str | None


_WF_FIELDS = frozenset({"workflow", "version", "context", "workflow_id", "correlation_id"})


def parse_workflow_start(raw: bytes, queue: str, *,
                         max_bytes: int = MAX_SUBMISSION_BYTES) -> WorkflowStart | None:
    """A body with a ``workflow`` field, validated; None for a body without one (a job's:
    :func:`parse_submission`). CodecError names the first problem."""
    if b'"workflow"' not in raw or len(raw) > max_bytes:
        return None  # a job's (the size is said by parse_submission)
    body = loads(raw)
    if not isinstance(body, dict) or "workflow" not in body:
        return None
    unknown = sorted(set(body) - _WF_FIELDS)
    if unknown:
        raise CodecError("unknown_field", f"unknown field(s) of a workflow start: "
                                          f"{', '.join(unknown)}; allowed: "
                                          f"{', '.join(sorted(_WF_FIELDS))}")
    name = body["workflow"]
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]{1,64}\Z", name):
        raise CodecError("bad_field", f"'workflow' must be a template name, got {name!r}")
    version = body.get("version")
    if version is not None and (type(version) is not int or version < 1):
        raise CodecError("bad_field", "'version' must be a positive integer")
    workflow_id = body.get("workflow_id")
    if workflow_id is not None and job_id_problem(workflow_id):
        raise CodecError("bad_workflow_id", (job_id_problem(workflow_id) or "").replace(
            "job id", "workflow id"))
    _check_depth(body.get("context"), "context")
    return WorkflowStart(queue, name, version, body.get("context"), workflow_id,
                         _correlation_id(body))


def check_handler_known(sub: Submission, known: Collection[str]) -> None:
    if sub.handler not in known:
        listed = ", ".join(sorted(known)) or "none yet: start a worker"
        raise CodecError("unknown_handler",
                         f"unknown handler {sub.handler!r}; known handlers: {listed}")


def _handler(body: dict[str, Any]) -> str:
    if "handler" not in body:
        raise CodecError("missing_field", "missing required field 'handler'")
    handler = body["handler"]
    if not isinstance(handler, str) or not HANDLER_RE.match(handler):
        raise CodecError("bad_field", "'handler' must be a string of 1-128 of A-Z a-z 0-9 _ . : -")
    return handler


def _args(body: dict[str, Any]) -> dict[str, Any]:
    args = body.get("args", {})
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise CodecError("bad_field", f"'args' must be a JSON object, got {type(args).__name__}")
    _check_depth(args, "args")
    return args


def _check_depth(value: Any, what: str, limit: int = MAX_ARGS_DEPTH) -> None:
    """Refuse a value nested deeper than ``limit`` (handlers walk what they are given)."""
    level: list[Any] = [value]
    for depth in range(limit + 1):
        level = [child for v in level if isinstance(v, dict | list)
                 for child in (v.values() if isinstance(v, dict) else v)]
        if not level:
            return
        if depth == limit - 1 and any(isinstance(v, dict | list) for v in level):
            raise CodecError("too_deep", f"{what!r} is nested deeper than {limit} levels")


def _int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if type(value) is not int or not lo <= value <= hi:
        raise CodecError("bad_field", f"'{name}' must be an integer from {lo} to {hi}, "
                                      f"got {value!r}")
    return value


def _job_id(body: dict[str, Any]) -> str | None:
    job_id = body.get("job_id")
    if job_id is None:
        return None
    problem = job_id_problem(job_id)
    if problem:
        raise CodecError("bad_job_id", problem)
    assert isinstance(job_id, str)
    return job_id


def _seconds(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value <= MAX_TIMEOUT_S:
        raise CodecError("bad_field", f"'{name}' must be a number in (0, {MAX_TIMEOUT_S:.0f}],"
                                      f" got {value!r}")
    return float(value)


def _retry(body: dict[str, Any]) -> dict[str, float] | None:
    """``{"base_s": 1, "factor": 2, "cap_s": 60, "jitter": 0.2}``, any subset."""
    value = body.get("retry")
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= set(_RETRY_FIELDS):
        raise CodecError("bad_field", f"'retry' must be an object with some of "
                                      f"{', '.join(_RETRY_FIELDS)}")
    for key, number in value.items():
        lo, hi = _RETRY_FIELDS[key]
        if type(number) not in (int, float) or not lo <= number <= hi:
            raise CodecError("bad_field", f"'retry.{key}' must be a number in [{lo:g}, {hi:g}]")
    return {k: float(v) for k, v in value.items()}


def _correlation_id(body: dict[str, Any]) -> str | None:
    value = body.get("correlation_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise CodecError("bad_field", "'correlation_id' must be a string of 1-128 characters")
    return value


def derive_job_id(msg_id: str | None, stream_epoch: str, seq: int) -> str:
    """A job id that depends only on the submission, so a redelivery or a replay agrees.

    With a ``Nats-Msg-Id`` the id derives from it (the same id twice is one job, also after
    the stream's dedup window); otherwise from the JF_SUBMIT stream's identity and sequence.
    """
    source = f"m:{msg_id}" if msg_id else f"s:{stream_epoch}:{seq}"
    digest = hashlib.blake2b(source.encode(), digest_size=10).digest()
    return "j" + _base32(digest)


_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648's alphabet, lower case


_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # two letters for each 10 bits
_PAIR_SHIFTS = tuple(range(70, -1, -10))


def _base32(ten: bytes) -> str:
    """``base64.b32encode(ten).decode().lower()`` for 10 bytes (80 bits: 16 letters, no
    padding), much faster: the standard library's is pure Python on 3.11."""
    n = int.from_bytes(ten, "big")
    return "".join([_B32_PAIRS[(n >> shift) & 1023] for shift in _PAIR_SHIFTS])


def header_problem(headers: Mapping[str, str]) -> str | None:
    """Why a submission's headers cannot be taken, or None. JetStream's own (``Nats-...``:
    expectations, rollups, TTLs) would change whether and how JF_SUBMIT stores it, so that
    a request could wait for an answer that never comes; of them a submission carries only
    ``Nats-Msg-Id`` (its idempotency key)."""
    for name in headers:  # (the usual case, at thousands a second: nothing to refuse)
        if name != HDR_MSG_ID and name[:5].lower() == "nats-":
            break
    else:
        return None
    foreign = sorted(k for k in headers if k[:5].lower() == "nats-" and k != HDR_MSG_ID)
    return (f"header(s) {', '.join(foreign)} are not for submissions: of JetStream's "
            f"headers a submission takes only {HDR_MSG_ID}")


def submission_fingerprint(subject: str, msg_id: str | None, raw: bytes) -> str:
    """Identifies one published submission across its core and its stream delivery."""
    h = hashlib.blake2b(digest_size=12)
    for part in (subject.encode(), b"\0", (msg_id or "").encode(), b"\0", raw):
        h.update(part)
    return h.hexdigest()


# What a submitter chose of a job: a resubmission of its id that differs in any of these is
# not an idempotent retry (the ids and sequences of the submission itself may differ).
CHOSEN_FIELDS = ("handler", "args", "queue", "priority", "max_attempts", "timeout_s",
                 "queue_timeout_s", "deadline_s", "retry", "correlation_id", "input", "output")


def differing_fields(existing: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The fields of a ``submitted`` event's data in which ``new`` is not ``existing``."""
    return [name for name in CHOSEN_FIELDS if existing.get(name) != new.get(name)]
