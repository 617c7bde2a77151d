"""The sentinel's spans, attached at its edges (tracing off: every hook passes through).

- one ``process jf.submit.<queue>`` span per submission (continues the submitter's
  ``traceparent``; a missing or malformed one starts a new trace); the ``submitted`` /
  ``rejected`` event, and so every later event and dispatch of the job, carries it on;
- one ``decide <event type>`` span per decision it records (retry_scheduled,
  dead_lettered, timed_out, cancelled...), a child of the job's submission span;
- one ``dispatch <queue>`` span per offer to a worker, starting when the job was queued
  (a ``queued`` event marks it), so its length is the job's queue wait; the worker's
  attempt span is its child. A ``queued`` decision gets no span of its own: the dispatch
  span that follows shows it, and each exported span costs CPU (bench/tracing.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jetflow.adapters import tracing
from jetflow.adapters.bus import Ack, Conflict
from jetflow.core import subjects as S
from jetflow.core.events import Event
from jetflow.core.fleet import Append, Dispatch
from jetflow.sentinel.intake import Decision, RawSubmission

__all__ = ["SentinelSpans", "SubmissionSpans", "DecisionSpans"]

TraceBook = Mapping[str, Mapping[str, str]]  # job id -> its trace/correlation headers


@dataclass
class SubmissionSpans:
    """The spans of one batch of submissions; ``raws`` carry them in their headers."""

    raws: list[RawSubmission]
    spans: list[Any] = field(default_factory=list)

    def finish(self, decisions: Sequence[Decision], recorded: Sequence[bool]) -> None:
        if not self.spans:
            return  # tracing is off
        for span, decision, ok in zip(self.spans, decisions, recorded, strict=True):
            _finish_submission(span, decision, ok)
        self.spans = []

    def abandon(self) -> None:
        for span in self.spans:
            tracing.finish(span, error="submission not processed", outcome="error")
        self.spans = []


def _finish_submission(span: Any, decision: Decision, ok: bool) -> None:
    event = decision.append.event
    span.set_attributes(tracing.job_attributes(
        job_id=event.id, handler=event.get("handler"), queue=event.get("queue"),
        correlation_id=decision.headers.get(S.HDR_CORRELATION_ID),
        priority=event.get("priority"), max_attempts=event.get("max_attempts")))
    if not ok:
        tracing.finish(span, error="recording the submission failed; it is redelivered",
                       outcome="retried")
    elif decision.accepted:
        tracing.finish(span, outcome="submitted")
    else:
        tracing.finish(span, error=f"rejected [{event.get('code')}]: {event.get('reason')}",
                       outcome="rejected")


@dataclass
class DecisionSpans:
    """The spans of one batch of decisions; ``headers`` gives each append its own."""

    trace: TraceBook
    spans: dict[int, Any] = field(default_factory=dict)

    def headers(self, append: Append) -> Mapping[str, str] | None:
        base = self.trace.get(append.event.id)
        if not tracing.enabled() or append.event.kind != "job" \
                or append.event.type == "queued":
            return base
        span = tracing.start(f"decide {append.event.type}", kind="producer", parent=base or {},
                             attributes=_decision_attributes(append.event, append.msg_id))
        self.spans[id(append)] = span
        return tracing.headers_of(span, base)

    def settled(self, appends: Sequence[Append], results: Sequence[Ack | Exception]) -> None:
        for append, result in zip(appends, results, strict=True):
            span = self.spans.pop(id(append), None)
            if span is None:
                continue
            if isinstance(result, Ack):
                tracing.finish(span, outcome="recorded", seq=result.seq)
            elif isinstance(result, Conflict):
                tracing.finish(span, outcome="conflict")  # somebody moved first: no error
            else:
                tracing.finish(span, error=f"append failed: {result}", outcome="error")

    def abandon(self) -> None:
        for span in self.spans.values():
            tracing.finish(span, error="append not settled", outcome="error")
        self.spans.clear()


def _decision_attributes(event: Event, msg_id: str) -> dict[str, Any]:
    data = event.data
    return {**tracing.messaging(S.job_subject(event.id, event.type), "publish", msg_id),
            **tracing.job_attributes(job_id=event.id, decision=event.type,
                                     attempt=data.get("attempt"), reason=data.get("reason"),
                                     retry_delay_s=data.get("delay_s"),
                                     not_before=data.get("not_before"))}


class SentinelSpans:
    """The hooks the sentinel service calls; each one passes through when tracing is off."""

    def __init__(self) -> None:
        self._ready_at: dict[str, float] = {}  # job id -> when it was last queued

    @contextlib.contextmanager
    def submissions(self, raws: list[RawSubmission]) -> Iterator[SubmissionSpans]:
        if not tracing.enabled():
            yield SubmissionSpans(raws)
            return
        spans = [tracing.start(f"process {r.subject}", kind="consumer", parent=r.headers,
                               attributes=tracing.messaging(
                                   r.subject, "process",
                                   r.headers.get(S.HDR_MSG_ID) or str(r.stream_seq)))
                 for r in raws]
        batch = SubmissionSpans([_carrying(r, s) for r, s in zip(raws, spans, strict=True)],
                                spans)
        try:
            yield batch
        finally:
            batch.abandon()

    @contextlib.contextmanager
    def decisions(self, trace: TraceBook) -> Iterator[DecisionSpans]:
        batch = DecisionSpans(trace)
        try:
            yield batch
        finally:
            batch.abandon()

    def observed(self, event: Event) -> None:
        """Remember when a job became ready (the start of its queue wait)."""
        if not tracing.enabled() or event.kind != "job":
            return
        if event.type == "queued" or (event.type == "submitted" and event.get("queued")):
            self._ready_at[event.id] = event.at
        else:
            self._ready_at.pop(event.id, None)

    def dispatched(self, d: Dispatch, headers: dict[str, str],
                   message_id: str) -> dict[str, str]:
        """A span for the offer, from the job's readiness to now; headers carrying it."""
        if not tracing.enabled():
            return headers
        now = time.time()
        ready_at = min(self._ready_at.get(d.job.job_id, now), now)
        job = d.job
        span = tracing.start(
            f"dispatch {job.queue}", kind="producer", parent=headers, start_time=ready_at,
            attributes={**tracing.messaging(S.work_subject(d.worker_id), "publish", message_id),
                        **tracing.job_attributes(
                            job_id=job.job_id, handler=job.handler, queue=job.queue,
                            attempt=job.attempt + 1, worker_id=d.worker_id,
                            priority=job.priority,
                            queue_wait_ms=round((now - ready_at) * 1000, 3))})
        span.add_event("queued", timestamp=int(ready_at * 1e9))
        out = tracing.headers_of(span, headers)
        tracing.finish(span)
        return out


def _carrying(raw: RawSubmission, span: Any) -> RawSubmission:
    """The submission as if it came with this span's context (what its events carry)."""
    return replace(raw, headers=tracing.headers_of(span, raw.headers))
