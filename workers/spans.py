"""The worker's spans, as decorators on the steps of an attempt and of the child's run.

- ``attempt <handler>``: one span per attempt, claim .. record, a child of the sentinel's
  dispatch span; the attempt's events and the job frame sent to the child carry it on.
  The two appends are span events (``claimed``, ``recorded``), not spans of their own:
  each exported span costs ~0.1 ms of CPU in the exporting process (see bench/tracing.py);
- ``run <handler>``: in the child process, around the handler; ``TRACEPARENT`` and
  ``JETFLOW_CORRELATION_ID`` in the child's environment name it for the handler's own
  code (and anything it starts).

Every log line written during an attempt carries the job's correlation id and trace id.
With tracing off the decorators only set that log context.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from jetflow.adapters import tracing
from jetflow.core import subjects as S
from jetflow.workers.pool import Outcome

__all__ = ["traced_attempt", "traced_claim", "traced_record", "traced_run", "Traced"]


class _Worker(Protocol):
    @property
    def worker_id(self) -> str: ...


class Traced(Protocol):
    """What the spans read of an attempt (:class:`jetflow.workers.attempt.Attempt`)."""

    headers: dict[str, str]

    @property
    def work(self) -> dict[str, Any]: ...

    @property
    def deps(self) -> _Worker: ...

    @property
    def job_id(self) -> str: ...

    @property
    def number(self) -> int: ...

    @property
    def outcome(self) -> Outcome | None: ...

    def msg_id(self, type_: str) -> str: ...


AttemptT = TypeVar("AttemptT", bound=Traced)
ERROR_OUTCOMES = ("failed", "timed_out")
ENV_TRACEPARENT = "TRACEPARENT"
ENV_TRACESTATE = "TRACESTATE"
ENV_CORRELATION_ID = "JETFLOW_CORRELATION_ID"


def _attempt_attributes(a: Traced, message_id: str | None) -> dict[str, Any]:
    w = a.work
    return {**tracing.messaging(S.work_subject(a.deps.worker_id), "process", message_id),
            **tracing.job_attributes(job_id=a.job_id, handler=w.get("handler"),
                                     queue=w.get("queue"), attempt=a.number,
                                     worker_id=a.deps.worker_id,
                                     correlation_id=a.headers.get(S.HDR_CORRELATION_ID))}


def traced_attempt(run: Callable[[AttemptT], Awaitable[None]]
                   ) -> Callable[[AttemptT], Awaitable[None]]:
    """``Attempt.run`` inside the attempt's span and log context."""

    @functools.wraps(run)
    async def wrapper(attempt: AttemptT) -> None:
        with tracing.log_context(attempt.headers):
            if not tracing.enabled():
                return await run(attempt)
            message_id = attempt.headers.get(S.HDR_MSG_ID)
            with tracing.span(f"attempt {attempt.work.get('handler')}", kind="consumer",
                              parent=attempt.headers,
                              attributes=_attempt_attributes(attempt, message_id)) as span:
                attempt.headers = tracing.inject(attempt.headers)  # onwards: this span
                await run(attempt)
                _mark_outcome(span, attempt.outcome)
        return None

    return wrapper


def _mark_outcome(span: Any, outcome: Outcome | None) -> None:
    if outcome is None:
        span.set_attribute("jetflow.outcome", "not_claimed")  # another worker, a stale offer
        return
    span.set_attribute("jetflow.outcome", outcome.kind)
    if outcome.duration_ms:
        span.set_attribute("jetflow.duration_ms", outcome.duration_ms)
    if outcome.kind in ERROR_OUTCOMES:
        error = outcome.error
        tracing.fail(span, error_type=str(error.get("error_type") or outcome.kind),
                     message=str(error.get("message") or ""),
                     stacktrace=error.get("traceback"))
        span.set_attribute("jetflow.retryable", bool(error.get("retryable", True)))


def traced_claim(claim: Callable[[AttemptT], Awaitable[int | None]]
                 ) -> Callable[[AttemptT], Awaitable[int | None]]:
    """``Attempt.claim`` (the ``started`` append) ends with a ``claimed`` span event."""

    @functools.wraps(claim)
    async def wrapper(attempt: AttemptT) -> int | None:
        seq = await claim(attempt)
        tracing.add_event("claimed" if seq is not None else "claimed elsewhere",
                          seq=seq, msg_id=attempt.msg_id("started"))
        return seq

    return wrapper


def traced_record(record: Callable[[AttemptT, Outcome], Awaitable[None]]
                  ) -> Callable[[AttemptT, Outcome], Awaitable[None]]:
    """``Attempt.record`` (the result's append) ends with a ``recorded`` span event."""

    @functools.wraps(record)
    async def wrapper(attempt: AttemptT, outcome: Outcome) -> None:
        await record(attempt, outcome)
        tracing.add_event("recorded", outcome=outcome.kind)

    return wrapper


def traced_run(run: Callable[[dict[str, Any]], dict[str, Any]]
               ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The child's ``_run(job) -> frame`` inside a ``run <handler>`` span, with the job's
    trace context and correlation id in the environment while the handler runs."""

    @functools.wraps(run)
    def wrapper(job: dict[str, Any]) -> dict[str, Any]:
        parent = {k: v for k in (S.HDR_TRACEPARENT, S.HDR_TRACESTATE) if (v := job.get(k))}
        with tracing.span(f"run {job.get('handler', '')}", parent=parent,
                          attributes=tracing.job_attributes(
                              job_id=job.get("job_id"), handler=job.get("handler"),
                              attempt=job.get("attempt"), queue=job.get("queue"),
                              correlation_id=job.get("correlation_id"))) as span:
            _set_environment(tracing.headers_of(span, parent), job.get("correlation_id"))
            frame = run(job)
            _mark_frame(span, frame)
        return frame

    return wrapper


def _set_environment(headers: dict[str, str], correlation_id: str | None) -> None:
    for name, value in ((ENV_TRACEPARENT, headers.get(S.HDR_TRACEPARENT)),
                        (ENV_TRACESTATE, headers.get(S.HDR_TRACESTATE)),
                        (ENV_CORRELATION_ID, correlation_id)):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)  # nothing left over from the previous job


def _mark_frame(span: Any, frame: dict[str, Any]) -> None:
    if span is None:
        return
    if frame.get("t") == "result":
        span.set_attribute("jetflow.outcome", "succeeded")
        return
    span.set_attribute("jetflow.outcome", "failed")
    tracing.fail(span, error_type=str(frame.get("error_type") or "Error"),
                 message=str(frame.get("message") or ""), stacktrace=frame.get("traceback"))
