"""The sentinel's state as a document, so that a restart need not fold the whole log.

A snapshot holds what :class:`~jetflow.core.fleet.Fleet` knows after folding the log up
to ``last_seq``: the active (and dead-lettered) jobs, the workers, the handlers ever
announced, the cancel reasons, the order of the ready jobs, the registered workflow
templates and the running workflows (:mod:`jetflow.core.workflow_doc`). It also names what it
covers: ``tip``, a digest of the stored message at ``last_seq`` (subject and data), and
the stream's creation time; a sentinel takes a snapshot only if the log still has that
very message there (or, the message having aged out, is the same stream). Pure: the
sentinel stores and loads it (:mod:`jetflow.sentinel.snapshots`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from jetflow.core.fleet import Fleet, WorkerInfo
from jetflow.core.job import as_fields, from_fields
from jetflow.core.plugin import PluginRegistry
from jetflow.core.retry import RetryPolicy
from jetflow.core.scheduler import ReadyJob, WorkerSlots
from jetflow.core.workflow_doc import restore_workflows, workflows_doc

__all__ = ["SNAPSHOT_VERSION", "SnapshotError", "take", "restore", "tip_digest", "due"]

SNAPSHOT_VERSION = 3  # 2: with the workflows; 3: with the plugin registry
_SETS = ("handlers", "queues", "beat_running", "beat_held")

EVERY_EVENTS = 20_000  # a snapshot once this many events were folded since the last one
EVERY_S = 60.0  # ... or this long after the last, if anything happened since
# Taking one costs about what folding this many events per job it holds does: with a
# backlog it waits for that many events (a snapshot of 50,000 queued jobs blocks the
# sentinel for ~0.3 s: every 20,000 events, that was a sixth of its time in a burst).
EVENTS_PER_JOB = 2


def due(moved: int, jobs: int, since_s: float) -> bool:
    """Whether a snapshot is worth taking: ``moved`` events folded since the last one,
    ``jobs`` in the fleet (what a snapshot writes), ``since_s`` seconds after it. A
    restart folds at most about max(20,000, 2 × jobs) events after a snapshot, and
    taking them costs the sentinel a bounded share of its time however big the backlog."""
    if moved <= 0:
        return False
    if moved >= max(EVERY_EVENTS, EVENTS_PER_JOB * jobs):
        return True
    # a quiet minute: worth it if folding what moved again costs a twentieth of taking it
    return since_s >= EVERY_S and moved * 20 >= jobs


class SnapshotError(ValueError):
    """A snapshot that cannot be used (another version, a field missing)."""


def tip_digest(subject: str, data: bytes) -> str:
    """What identifies the stored message a snapshot ends at."""
    h = hashlib.sha256(subject.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def take(fleet: Fleet, *, tip: str, stream_created: str) -> dict[str, Any]:
    """The fleet as a JSON-able document, covering the log up to ``fleet.last_seq``."""
    sched = fleet.sched
    workers = []
    for w in fleet.workers.values():
        doc = {f.name: getattr(w, f.name) for f in dataclasses.fields(WorkerInfo)}
        for name in _SETS:
            doc[name] = sorted(doc[name])
        slots = sched.workers().get(w.worker_id)
        doc["slots"] = slots.concurrency if slots is not None else None
        workers.append(doc)
    return {
        "v": SNAPSHOT_VERSION, "last_seq": fleet.last_seq, "tip": tip,
        "stream_created": stream_created,
        "jobs": [as_fields(job) for job in fleet.jobs.values()],
        "ready": {job_id: ready.order for job_id, ready in sched.ready_jobs().items()},
        "workers": workers,
        "known_handlers": sorted(fleet.known_handlers),
        "cancel_reasons": dict(fleet.cancel_reasons()),
        "template_digests": {name: {str(v): sha for v, sha in versions.items()}
                             for name, versions in fleet.template_digests.items()},
        "workflows": workflows_doc(fleet.workflows),
        "plugins": fleet.plugins.as_doc(),
    }


def restore(doc: dict[str, Any], *, policy: RetryPolicy,
            queue_policies: dict[str, RetryPolicy], lease_s: float) -> Fleet:
    """A fleet that knows what the snapshot says; every job marked to be looked at
    again (timers, lost leases and offers are decided anew, as after a reconcile)."""
    if doc.get("v") != SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot version {doc.get('v')!r}, this jetflow reads "
                            f"{SNAPSHOT_VERSION}")
    try:
        fleet = Fleet(policy=policy, queue_policies=dict(queue_policies), lease_s=lease_s)
        fleet.last_seq = fleet.tail_seq = int(doc["last_seq"])
        fleet.known_handlers = set(doc["known_handlers"])
        for fields in doc["jobs"]:
            job = from_fields(fields)
            fleet.jobs[job.job_id] = job
        _restore_workers(fleet, doc["workers"])
        _restore_schedule(fleet, doc["ready"])
        for job_id, reason in doc["cancel_reasons"].items():
            fleet.note_cancel_reason(job_id, reason)
        fleet.template_digests = {name: {int(v): str(sha) for v, sha in versions.items()}
                                  for name, versions in doc["template_digests"].items()}
        fleet.workflows = restore_workflows(doc["workflows"])
        fleet.plugins = PluginRegistry.from_doc(doc["plugins"])
        fleet.grant_plugins()
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot unreadable: {type(exc).__name__}: {exc}") from None
    fleet.reconcile()
    return fleet


def _restore_workers(fleet: Fleet, workers: list[dict[str, Any]]) -> None:
    for doc in workers:
        slots = doc.pop("slots")
        values: dict[str, Any] = {k: (frozenset(v) if k in _SETS else v) for k, v in doc.items()}
        info = WorkerInfo(**values)
        fleet.workers[info.worker_id] = info
        if info.status == "live" and slots is not None:
            fleet.sched.add_worker(WorkerSlots(info.worker_id, info.handlers, info.queues,
                                               int(slots), early=info.early_offers))


def _restore_schedule(fleet: Fleet, ready: dict[str, int]) -> None:
    for job in fleet.jobs.values():
        if job.state == "queued":
            fleet.sched.add_ready(ReadyJob(job.job_id, job.queue, job.handler, job.priority,
                                           int(ready.get(job.job_id, job.last_seq))))
        elif job.state == "running" and job.worker:
            fleet.sched.occupy(job.job_id, job.worker)
        fleet.arm_timeouts(job)
