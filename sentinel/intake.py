"""Turning one raw submission into the event that records it: ``submitted`` or
``rejected``. No I/O: the sentinel service feeds it what JF_SUBMIT delivered."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, loads
from jetflow.core.events import Event
from jetflow.core.fleet import Append
from jetflow.core.plugin import PluginRegistry
from jetflow.core.submission import (
    HANDLER_RE,
    JOB_ID_RE,
    MAX_SUBMISSION_BYTES,
    Submission,
    WorkflowStart,
    check_handler_known,
    derive_job_id,
    header_problem,
    parse_submission,
    parse_workflow_start,
    submission_fingerprint,
)

__all__ = ["Intake", "RawSubmission", "Decision"]

log = logging.getLogger("jetflow.sentinel")

KEEP_BODY_BYTES = 4096  # how much of a rejected body the `rejected` event keeps


@dataclass(frozen=True, slots=True)
class RawSubmission:
    subject: str
    data: bytes
    headers: Mapping[str, str]
    stream_seq: int


@dataclass(frozen=True, slots=True)
class Decision:
    append: Append
    fingerprint: str
    derived_id: str  # where a rejection goes if the submitter's own id is taken
    headers: dict[str, str]

    @property
    def accepted(self) -> bool:
        return self.append.event.type in ("submitted", "started")


@dataclass
class Intake:
    stream_epoch: str
    max_bytes: int = MAX_SUBMISSION_BYTES
    default_max_attempts: int = 3

    def parse(self, raw: RawSubmission) -> Submission:
        """Validate everything that does not depend on the sentinel's knowledge."""
        queue = S.queue_of_submit_subject(raw.subject)
        if queue is None:
            raise CodecError("bad_subject", f"submit subject {raw.subject!r} must be "
                                            "jf.submit.<queue>")
        return parse_submission(raw.data, queue, max_bytes=self.max_bytes,
                                default_max_attempts=self.default_max_attempts)

    def decide(self, raw: RawSubmission, known_handlers: Collection[str],
               now: float, templates: Mapping[str, Mapping[int, str]] | None = None,
               plugins: PluginRegistry | None = None) -> Decision:
        """The event recording ``raw``: a job's ``submitted``, a workflow's ``started``
        (``templates``: name -> {version: sha256} of the registered ones) or, for what
        cannot be either, ``rejected``."""
        msg_id = raw.headers.get(S.HDR_MSG_ID) or None
        derived = derive_job_id(msg_id, self.stream_epoch, raw.stream_seq)
        fingerprint = submission_fingerprint(raw.subject, msg_id, raw.data)
        problem = header_problem(raw.headers)
        if problem:  # refused at once when requested (the sentinel's _on_request): no fp
            return self._rejected(raw, derived, "", CodecError("bad_header", problem), now)
        try:
            start = parse_workflow_start(raw.data, S.queue_of_submit_subject(raw.subject)
                                         or "", max_bytes=self.max_bytes)
            if start is not None:
                return self._start(raw, start, templates or {}, now, derived, fingerprint)
            sub = self.parse(raw)
            pin = _plugin_pin(sub, plugins)
            if pin is None:
                check_handler_known(sub, known_handlers)
        except CodecError as exc:
            return self._rejected(raw, derived, fingerprint, exc, now)
        except Exception as exc:  # noqa: BLE001 - one submission must not stop the intake
            log.exception("submission at %s seq %d could not be read", raw.subject,
                          raw.stream_seq)
            return self._rejected(raw, derived, fingerprint, CodecError(
                "unreadable", f"the sentinel could not read it ({type(exc).__name__})"), now)
        job_id = sub.job_id or derived
        correlation_id = (sub.correlation_id or raw.headers.get(S.HDR_CORRELATION_ID)
                          or job_id)
        data = {"queue": sub.queue, "handler": sub.handler, "args": sub.args,
                "priority": sub.priority, "max_attempts": sub.max_attempts,
                "timeout_s": sub.timeout_s, "correlation_id": correlation_id,
                **_optional(queue_timeout_s=sub.queue_timeout_s, deadline_s=sub.deadline_s,
                            retry=sub.retry, msg_id=msg_id, plugin=pin, input=sub.input,
                            output=sub.output),
                "submit_seq": raw.stream_seq, "fp": fingerprint,
                "queued": True}  # queued for attempt 1 with it: one event, not two
        event = Event("job", job_id, "submitted", now, data)
        return Decision(Append(event, 0, f"{job_id}:submitted"), fingerprint, derived,
                        self.trace_headers(raw.headers, correlation_id))

    def _start(self, raw: RawSubmission, start: WorkflowStart,
               templates: Mapping[str, Mapping[int, str]], now: float, derived: str,
               fingerprint: str) -> Decision:
        versions = templates.get(start.workflow)
        if not versions:
            listed = ", ".join(sorted(templates)) or "none yet: jetflow workflow register FILE"
            raise CodecError("unknown_workflow", f"unknown workflow {start.workflow!r}; "
                                                 f"registered: {listed}")
        version = start.version or max(versions)
        if version not in versions:
            raise CodecError("unknown_version", f"workflow {start.workflow!r} has versions "
                                                f"{sorted(versions)}, not {version}")
        workflow_id = start.workflow_id or "w" + derived[1:]
        msg_id = raw.headers.get(S.HDR_MSG_ID) or None
        correlation_id = (start.correlation_id or raw.headers.get(S.HDR_CORRELATION_ID)
                          or workflow_id)
        data = {"template": start.workflow, "version": version, "sha256": versions[version],
                "context": start.context, "queue": start.queue,
                "correlation_id": correlation_id, "submit_seq": raw.stream_seq,
                "fp": fingerprint, **_optional(msg_id=msg_id)}
        event = Event("wf", workflow_id, "started", now, data)
        return Decision(Append(event, 0, f"wf:{workflow_id}:started"), fingerprint, derived,
                        self.trace_headers(raw.headers, correlation_id))

    def _rejected(self, raw: RawSubmission, derived: str, fingerprint: str,
                  exc: CodecError, now: float) -> Decision:
        claimed = _claimed(raw.data)
        job_id = claimed.get("job_id") or derived
        data = {"reason": exc.message, "code": exc.code,
                **_optional(handler=claimed.get("handler")),
                "queue": S.queue_of_submit_subject(raw.subject) or "",
                "subject": raw.subject, "submit_seq": raw.stream_seq, "fp": fingerprint,
                "body": raw.data[:KEEP_BODY_BYTES].decode("utf-8", errors="replace"),
                "body_bytes": len(raw.data),
                **_optional(msg_id=raw.headers.get(S.HDR_MSG_ID) or None)}
        event = Event("job", job_id, "rejected", now, data)
        return Decision(Append(event, 0, f"{job_id}:rejected:{raw.stream_seq}"), fingerprint,
                        derived, self.trace_headers(raw.headers, job_id))

    @staticmethod
    def job_id_of(data: bytes, msg_id: str | None) -> str:
        """The job a submission names: its own job_id, else the one its msg id derives."""
        return _claimed(data).get("job_id") or derive_job_id(msg_id, "", 0)

    @staticmethod
    def trace_headers(headers: Mapping[str, str], correlation_id: str) -> dict[str, str]:
        out = {S.HDR_CORRELATION_ID: correlation_id}
        for name in (S.HDR_TRACEPARENT, S.HDR_TRACESTATE):
            if headers.get(name):
                out[name] = headers[name]
        return out


def _plugin_pin(sub: Submission, plugins: PluginRegistry | None) -> dict[str, Any] | None:
    """For a job whose handler is a deployed plugin's name: the version active now (the
    job runs it whatever is deployed later, retries and replays included)."""
    if plugins is None or sub.handler not in plugins.versions:
        if sub.input is not None or sub.output is not None:
            raise CodecError("not_a_plugin", f"'input'/'output' are for plugin jobs; "
                                             f"{sub.handler!r} is no deployed plugin")
        return None
    active = plugins.active(sub.handler)
    if active is None:
        statuses = ", ".join(f"{v.version} {v.status}"
                             for v in plugins.versions[sub.handler].values())
        raise CodecError("no_active_version", f"plugin {sub.handler!r} has no active "
                                              f"version ({statuses}): jetflow plugin "
                                              "activate NAME --version V")
    if sub.input is None:
        raise CodecError("missing_field", f"plugin {sub.handler!r} needs 'input' (the file "
                                          "its parse() reads)")
    pin: dict[str, Any] = {"version": active.version, "sha256": active.sha256}
    if active.requirements:
        pin["env"] = True  # offered only to workers that built its environment
    return pin


def _optional(**fields: object) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v is not None}


def _claimed(data: bytes) -> dict[str, str]:
    """The submitter's own ``job_id`` and the ``handler`` it names, each when the body is
    readable enough to have a valid one (a rejected submission is listed by both)."""
    try:
        body = loads(data) if len(data) <= MAX_SUBMISSION_BYTES else None
    except CodecError:
        return {}
    if not isinstance(body, dict):
        return {}
    return {field: value for field, pattern in (("job_id", JOB_ID_RE), ("handler", HANDLER_RE))
            if isinstance(value := body.get(field), str) and pattern.match(value)}
