"""Dispatch decisions: strict priority per queue, capability matching, worker slots. Pure.

Ready jobs live in one heap per (queue, handler), ordered by (-priority, order) where
``order`` is the stream sequence of the job's ``queued`` event: higher priority first,
FIFO within a priority. A worker with a free slot takes the best job among the heaps it
can serve (its queues x its handlers), so a job whose handler no free worker has never
blocks the jobs behind it. Removal is lazy: stale heap entries are skipped when popped.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

__all__ = ["Scheduler", "WorkerSlots", "ReadyJob"]


@dataclass(frozen=True, slots=True)
class ReadyJob:
    job_id: str
    queue: str
    handler: str
    priority: int
    order: int


@dataclass(slots=True)
class WorkerSlots:
    worker_id: str
    handlers: frozenset[str]
    queues: frozenset[str]
    concurrency: int
    assigned: set[str] = field(default_factory=set)
    paused: bool = False  # silent (missed heartbeats): no new offers until it beats again
    early: bool = False  # it takes early offers (see :meth:`Scheduler.reserve`)

    @property
    def free(self) -> int:
        return self.concurrency - len(self.assigned)


class Scheduler:
    def __init__(self) -> None:
        self._heaps: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        self._ready: dict[str, ReadyJob] = {}
        self._assigned: dict[str, str] = {}  # job id -> worker id
        self._workers: dict[str, WorkerSlots] = {}

    # -- jobs ---------------------------------------------------------------------------
    def add_ready(self, job: ReadyJob) -> None:
        self.release(job.job_id)
        self._ready[job.job_id] = job
        heap = self._heaps.setdefault((job.queue, job.handler), [])
        heapq.heappush(heap, (-job.priority, job.order, job.job_id))

    def discard(self, job_id: str) -> None:
        """The job is no longer waiting for a worker (started, cancelled, finished...)."""
        self._ready.pop(job_id, None)

    def release(self, job_id: str) -> str | None:
        """Free the slot the job held, if any; return the worker it was assigned to."""
        worker_id = self._assigned.pop(job_id, None)
        if worker_id is not None and worker_id in self._workers:
            self._workers[worker_id].assigned.discard(job_id)
        return worker_id

    def occupy(self, job_id: str, worker_id: str) -> None:
        """The job runs on this worker (seen in the log), whoever dispatched it."""
        self.discard(job_id)
        if self._assigned.get(job_id) == worker_id:
            return
        self.release(job_id)
        if worker_id in self._workers:
            self._assigned[job_id] = worker_id
            self._workers[worker_id].assigned.add(job_id)

    def is_ready(self, job_id: str) -> bool:
        return job_id in self._ready

    def assigned_to(self, job_id: str) -> str | None:
        return self._assigned.get(job_id)

    def ready_jobs(self) -> dict[str, ReadyJob]:
        return self._ready

    def ready_count(self) -> int:
        return len(self._ready)

    # -- workers ------------------------------------------------------------------------
    def add_worker(self, worker: WorkerSlots) -> None:
        old = self._workers.get(worker.worker_id)
        if old is not None:
            worker.assigned |= old.assigned
        self._workers[worker.worker_id] = worker

    def remove_worker(self, worker_id: str) -> set[str]:
        """Forget a worker; return the ids of the jobs it held."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return set()
        for job_id in worker.assigned:
            self._assigned.pop(job_id, None)
        return set(worker.assigned)

    def pause(self, worker_id: str) -> set[str]:
        """Offer the worker nothing more until :meth:`resume`; return the jobs it holds."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return set()
        worker.paused = True
        return set(worker.assigned)

    def resume(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.paused = False

    def workers(self) -> dict[str, WorkerSlots]:
        return self._workers

    def handlers_available(self) -> frozenset[str]:
        return frozenset(h for w in self._workers.values() for h in w.handlers)

    # -- matching -----------------------------------------------------------------------
    def dispatch(self) -> list[tuple[ReadyJob, str]]:
        """Fill every free slot with the best job it can take; return (job, worker) pairs.
        Slots are filled in rounds, one job per worker a round, the emptiest worker first:
        a few jobs spread over the idle workers instead of filling one worker's slots (its
        prefetch buffer included) while another waits."""
        out: list[tuple[ReadyJob, str]] = []
        candidates = [w for w in self._workers.values() if w.free > 0 and not w.paused]
        while candidates:
            candidates.sort(key=lambda w: -w.free)
            still: list[WorkerSlots] = []
            for worker in candidates:
                job = self._pop_best(worker)
                if job is None:
                    continue  # nothing it can take: not in the next round either
                self._assigned[job.job_id] = worker.worker_id
                worker.assigned.add(job.job_id)
                out.append((job, worker.worker_id))
                if worker.free > 0:
                    still.append(worker)
            candidates = still
        return out

    def reserve(self, job_id: str, queue: str, handler: str) -> str | None:
        """A slot for a job not ready yet (its ``submitted`` on its way to the log) on the
        worker :meth:`dispatch` would pick, provided no ready job waits for that worker
        (it would come first: strict priority); the worker, or None."""
        if job_id in self._assigned or job_id in self._ready:
            return None
        free = [w for w in self._workers.values() if w.early and w.free > 0
                and not w.paused and queue in w.queues and handler in w.handlers]
        if not free:
            return None
        worker = max(free, key=lambda w: w.free)
        if self._best_key(worker) is not None:
            return None  # (a moment between a slot freeing and the next dispatch)
        self._assigned[job_id] = worker.worker_id
        worker.assigned.add(job_id)
        return worker.worker_id

    def _pop_best(self, worker: WorkerSlots) -> ReadyJob | None:
        best_key = self._best_key(worker)
        if best_key is None:
            return None
        _neg, _order, job_id = heapq.heappop(self._heaps[best_key])
        return self._ready.pop(job_id)

    def _best_key(self, worker: WorkerSlots) -> tuple[str, str] | None:
        """The heap holding the best ready job the worker can take, if any."""
        best_key: tuple[str, str] | None = None
        best: tuple[int, int, str] | None = None
        for queue in worker.queues:
            for handler in worker.handlers:
                top = self._top((queue, handler))
                if top is not None and (best is None or top < best):
                    best, best_key = top, (queue, handler)
        return best_key

    def _top(self, key: tuple[str, str]) -> tuple[int, int, str] | None:
        heap = self._heaps.get(key)
        while heap:
            neg_prio, order, job_id = heap[0]
            job = self._ready.get(job_id)
            if job is not None and job.order == order and job.queue == key[0] \
                    and job.handler == key[1]:
                return heap[0]
            heapq.heappop(heap)
        return None
