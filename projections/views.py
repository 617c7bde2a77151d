"""How a batch of events changes the read models: pure functions from the events (and the
views they touch, as they were before the batch) to rows.

No clock, no randomness, no I/O: the same events always give the same rows, which is what
makes a replay equal to the live projection. Times come from the events (``at``).
Anything that cannot be applied (undecodable, unknown type, impossible transition) becomes
a projection error row with its reason, and the batch goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from jetflow.core.codec import CodecError, decode_event, dumps, loads
from jetflow.core.events import Event
from jetflow.core.job import Fields, JobState, as_fields, from_fields, try_step
from jetflow.core.metadata import Stored, header_value
from jetflow.core.origin import SIG_HEADER, Origin
from jetflow.core.subjects import HDR_TRACEPARENT

__all__ = [
    "Raw",
    "JobView",
    "WorkerView",
    "BatchRows",
    "fold_batch",
    "job_row",
    "job_view_from_row",
    "worker_row",
    "worker_view_from_row",
    "trace_id_of",
    "WORKFLOW_COLUMNS",
    "SUMMARY_CHARS",
]

SUMMARY_CHARS = 200  # of a job's result kept in the jobs table (the timeline has it all)
_RAW_CHARS = 2000  # of an unusable message kept in projection_errors


Raw = Stored  # one stored message as the projection sees it


@dataclass(slots=True)
class JobView:
    """A job's fields (:func:`jetflow.core.job.as_fields`) plus what only the projection tracks.

    The fold never changes a view it was given: a batch works on its own copy of each job
    it touches, so the views in a cache stay as the rows written before the batch."""

    fields: Fields
    trace_id: str | None = None
    queued_at: float | None = None  # when it last entered the queue
    workflow_id: str | None = None  # a workflow step's job: its workflow...
    step: str | None = None  # ... and step

    @classmethod
    def of(cls, state: JobState, trace_id: str | None = None,
           queued_at: float | None = None) -> JobView:
        return cls(as_fields(state), trace_id, queued_at)

    @property
    def state(self) -> JobState:
        return from_fields(self.fields)

    def copy(self) -> JobView:
        return JobView(dict(self.fields), self.trace_id, self.queued_at, self.workflow_id,
                       self.step)


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    host: str = ""
    pid: int = 0
    handlers: str = ""
    queues: str = ""
    concurrency: int = 0
    status: str = "unknown"  # live, lost, stopped (idle/busy/draining are read-time)
    joined_at: float | None = None
    left_at: float | None = None
    reason: str | None = None
    succeeded: int = 0
    failed: int = 0
    last_seq: int = 0


JobLookup = Callable[[str], JobView | None]
WorkerLookup = Callable[[str], WorkerView | None]
Key = tuple[Any, ...]


@dataclass
class BatchRows:
    """Everything one batch changes. ``before`` holds each touched job as it was before
    the batch (None if new), so the counters move by the net change."""

    jobs: dict[str, JobView] = field(default_factory=dict)
    before: dict[str, JobView | None] = field(default_factory=dict)
    workers: dict[str, WorkerView] = field(default_factory=dict)
    # workflow id -> the columns its events of the batch set (all of them after `started`)
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    templates: list[tuple[Any, ...]] = field(default_factory=list)
    timeline: list[tuple[int, str, str, str, float, str]] = field(default_factory=list)
    errors: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    throughput: dict[Key, list[int]] = field(default_factory=dict)
    last_seq: int = 0
    last_at: float | None = None

    def queue_states(self) -> dict[Key, int]:
        """Net change of the per (queue, state) job counts."""
        return self._deltas(lambda v: (v.fields["queue"], v.fields["state"]))

    def queue_depth(self) -> dict[Key, int]:
        """Net change of the per (queue, priority) counts of queued jobs."""
        return self._deltas(lambda v: (v.fields["queue"], v.fields["priority"])
                            if v.fields["state"] == "queued" else None)

    def _deltas(self, key: Callable[[JobView], Key | None]) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for job_id, after in self.jobs.items():
            old = self.before.get(job_id)
            old_key = key(old) if old is not None else None
            new_key = key(after)
            if old_key == new_key:
                continue
            if old_key is not None:
                out[old_key] = out.get(old_key, 0) - 1
            if new_key is not None:
                out[new_key] = out.get(new_key, 0) + 1
        return {k: n for k, n in out.items() if n}


def fold_batch(messages: list[Raw], jobs: JobLookup, workers: WorkerLookup,
               last_at: float | None = None, origin: Origin | None = None) -> BatchRows:
    """Apply ``messages`` in order; ``jobs``/``workers`` give a view as it was before the
    batch (None if unknown); ``last_at`` is the latest event time before the batch. With
    ``origin``, a worker's event not signed by whom it names is an error row."""
    fold = _Fold(jobs, workers, BatchRows(last_at=last_at), origin or _UNCHECKED)
    for raw in messages:
        fold.add(raw)
    fold.credit_workers()
    return fold.rows


_UNCHECKED = Origin(None)


class _Fold:
    def __init__(self, jobs: JobLookup, workers: WorkerLookup, rows: BatchRows,
                 origin: Origin) -> None:
        self.origin = origin
        self.load_job = jobs
        self.load_worker = workers
        self.rows = rows
        self.credits: dict[str, list[int]] = {}  # worker id -> [succeeded, failed]

    def add(self, raw: Raw) -> None:
        rows = self.rows
        seq = raw.seq
        if seq > rows.last_seq:
            rows.last_seq = seq
        try:
            event = decode_event(raw.subject, raw.data, seq)
        except CodecError as exc:
            self._error(raw, exc.code, exc.message)
            return
        kind = event.kind
        if self.origin.checks(event):
            why = self.origin.refusal(event, raw.subject, raw.data,
                                      header_value(raw.headers, SIG_HEADER))
            if why is not None:
                self._error(raw, "origin_refused", why)
                return
        problem = (self._job(event, raw) if kind == "job" else self._worker(event)
                   if kind == "worker" else self._workflow(event) if kind == "wf" else None)
        if problem:
            self._error(raw, *problem)
            return
        at = event.at
        rows.timeline.append((seq, event.kind, event.id, event.type, at, raw.data.decode()))
        if rows.last_at is None or at > rows.last_at:
            rows.last_at = at

    def _error(self, raw: Raw, code: str, reason: str) -> None:
        text = raw.data[:_RAW_CHARS].decode("utf-8", "replace")
        self.rows.errors.append((raw.seq, raw.subject, code, reason, text))

    # -- jobs -------------------------------------------------------------------------
    def _job(self, event: Event, raw: Raw) -> tuple[str, str] | None:
        type_ = event.type
        view = self.rows.jobs.get(event.id) or self._working(event.id)
        values = view.fields
        old_state, old_worker = values["state"], values["worker"]
        if type_ == "submitted":
            # The projection keeps no arguments (the timeline has the whole event), so
            # neither the state cache nor state_json grows with them.
            event.data["args"] = None
        refused = try_step(values, event)  # leaves ``values`` as it was if refused
        if refused is not None:
            return refused
        if type_ in ("submitted", "skipped") and event.data.get("workflow"):
            view.workflow_id = str(event.data["workflow"])
            view.step = str(event.data.get("step") or "")
        if type_ == "queued" or type_ == "handed_back":
            view.queued_at = event.at
        elif type_ == "submitted" or type_ == "rejected":
            view.trace_id = trace_id_of(header_value(raw.headers, HDR_TRACEPARENT))
            if values["state"] == "queued":  # submitted and queued in one event (v2)
                view.queued_at = event.at
        self.rows.jobs[event.id] = view
        if type_ in _OUTCOME_COLUMN:
            self._count(old_state, old_worker, values, event)
        return None

    def _working(self, job_id: str) -> JobView:
        """A new copy of a job's view as it was before the batch (a new job's, if
        unknown), for the batch to work on."""
        rows = self.rows
        if job_id not in rows.before:
            rows.before[job_id] = self.load_job(job_id)
        before = rows.before[job_id]
        if before is not None:
            return before.copy()
        return JobView({**_NEW_JOB, "job_id": job_id})

    def _count(self, old_state: str, old_worker: str | None, new: Fields,
               event: Event) -> None:
        column = _OUTCOME_COLUMN[event.type]
        key = (new["queue"], int(event.at // 60))
        counts = self.rows.throughput.setdefault(key, [0, 0, 0])
        counts[column] += 1
        if column == 0 and new["worker"]:
            self.credits.setdefault(new["worker"], [0, 0])[0] += 1
        elif column == 1 and old_state == "running" and old_worker:
            self.credits.setdefault(old_worker, [0, 0])[1] += 1

    def credit_workers(self) -> None:
        """Add the batch's outcomes to the workers that ran them (once per worker)."""
        for worker_id, (succeeded, failed) in self.credits.items():
            w = self._worker_now(worker_id)
            self.rows.workers[worker_id] = replace(w, succeeded=w.succeeded + succeeded,
                                                   failed=w.failed + failed)

    # -- workflows ----------------------------------------------------------------------
    def _workflow(self, event: Event) -> tuple[str, str] | None:
        d = event.data
        if event.type == "registered":
            self.rows.templates.append((d["name"], d["version"], d["sha256"], d["steps"],
                                        d.get("label"), d.get("description"), event.at,
                                        event.seq))
            return None
        cols = self.rows.workflows.setdefault(event.id, {})
        if event.type == "started":
            cols.update(workflow_id=event.id, name=d["template"], version=d["version"],
                        state="running", queue=d.get("queue"),
                        correlation_id=d.get("correlation_id"),
                        context=_json(d.get("context")), started_at=event.at,
                        finished_at=None, result=None, reason=None, cancel_requested=0)
        elif event.type == "cancel_requested":
            cols["cancel_requested"] = 1
        elif event.type in ("succeeded", "failed", "cancelled"):
            cols.update(state=event.type, finished_at=event.at,
                        result=_summary(d.get("result")), reason=d.get("reason"))
        cols["last_seq"] = event.seq
        return None

    # -- workers ----------------------------------------------------------------------
    def _worker(self, event: Event) -> tuple[str, str] | None:
        worker = self._worker_now(event.id)
        if event.type == "joined":
            worker = _joined(worker, event)
        else:
            status = "stopped" if event.type == "left" else event.type
            worker = replace(worker, status=status, left_at=event.at,
                             reason=str(event.data["reason"]), last_seq=event.seq)
        self.rows.workers[event.id] = worker
        return None

    def _worker_now(self, worker_id: str) -> WorkerView:
        worker = self.rows.workers.get(worker_id) or self.load_worker(worker_id)
        return worker or WorkerView(worker_id)


_NEW_JOB = as_fields(JobState(""))

# succeeded, failed (an attempt that failed or timed out), dead_lettered
_OUTCOME_COLUMN = {"succeeded": 0, "failed": 1, "timed_out": 1, "dead_lettered": 2}


def _joined(worker: WorkerView, e: Event) -> WorkerView:
    data = e.data
    pid = data.get("pid")
    return replace(
        worker, host=str(data.get("host") or ""), pid=pid if type(pid) is int else 0,
        handlers=",".join(str(h) for h in data["handlers"]),
        queues=",".join(str(q) for q in data["queues"]), concurrency=data["concurrency"],
        status="live", joined_at=e.at, left_at=None, reason=None, last_seq=e.seq)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), or None."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    trace_id = parts[1].lower()
    if trace_id.strip("0123456789abcdef") or trace_id == "0" * 32:
        return None
    return trace_id


# -- rows -------------------------------------------------------------------------------

def job_row(view: JobView) -> tuple[Any, ...]:
    """The jobs table's row (column order of the schema)."""
    s = view.fields
    return (s["job_id"], s["queue"], s["handler"], s["priority"], s["state"], s["attempt"],
            s["max_attempts"], s["worker"], s["correlation_id"], view.trace_id,
            s["submitted_at"], view.queued_at, s["started_at"], s["finished_at"],
            _summary(s["result"]), _json(s["error"]), s["last_seq"], s["events"],
            dumps(s).decode(), view.workflow_id, view.step)


def job_view_from_row(trace_id: str | None, queued_at: float | None,
                      state_json: str, workflow_id: str | None = None,
                      step: str | None = None) -> JobView:
    return JobView(loads(state_json), trace_id, queued_at, workflow_id, step)


WORKFLOW_COLUMNS = ("workflow_id", "name", "version", "state", "queue", "correlation_id",
                    "context", "started_at", "finished_at", "result", "reason",
                    "cancel_requested", "last_seq")


def worker_row(w: WorkerView) -> tuple[Any, ...]:
    return (w.worker_id, w.host, w.pid, w.handlers, w.queues, w.concurrency, w.status,
            w.joined_at, w.left_at, w.reason, w.succeeded, w.failed, w.last_seq)


def worker_view_from_row(row: tuple[Any, ...]) -> WorkerView:
    return WorkerView(*row)


def _summary(value: Any) -> str | None:
    if value is None:
        return None
    text = dumps(value).decode()
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "…"


def _json(value: Any) -> str | None:
    return None if value is None else dumps(value).decode()
