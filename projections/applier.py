"""Applying batches to a projection file: fold in memory, write with the checkpoint.

Shared by the live projector and the replay tooling, so both produce the same rows by
construction. Per batch: one query loads the jobs it touches that are not cached, the
pure :func:`fold_batch` computes every row, one transaction writes them with the
checkpoint. While that runs, the reader's next pull request is already being answered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from jetflow.core import subjects as S
from jetflow.core.job import TERMINAL
from jetflow.core.origin import Origin
from jetflow.projections.store import Store
from jetflow.projections.views import JobView, Raw, WorkerView, fold_batch

__all__ = ["Applier", "JobCache"]


class JobCache:
    """A bounded LRU of job views. A job that reached a terminal state leaves it once its
    batch is written (it rarely changes again); the least recently touched leave first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._views: OrderedDict[str, JobView] = OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._views

    def get(self, job_id: str) -> JobView | None:
        return self._views.get(job_id)

    def remember(self, views: dict[str, JobView]) -> None:
        """Keep the views a batch just wrote: terminal ones go, the others move to the end."""
        for job_id, view in views.items():
            if view.fields["state"] in TERMINAL:
                self._views.pop(job_id, None)
            else:
                self._views[job_id] = view
                self._views.move_to_end(job_id)
        while len(self._views) > self.capacity:
            self._views.popitem(last=False)

    def clear(self) -> None:
        self._views.clear()


class Applier:
    """Applies batches of :class:`Raw` past the file's checkpoint. Worker views are few
    and all kept in memory; job views go through a :class:`JobCache`."""

    def __init__(self, store: Store, *, cache_size: int = 50_000,
                 origin: Origin | None = None) -> None:
        self.store = store
        self.origin = origin  # checks who wrote a worker's events (see core.origin)
        self.jobs = JobCache(cache_size)
        self.last_seq, self.last_at = store.checkpoint()
        self.workers: dict[str, WorkerView] = store.load_workers_all()
        self._loaded: dict[str, JobView] = {}

    def apply(self, batch: list[Raw]) -> None:
        """Fold ``batch`` (what is at or below the checkpoint is skipped) and write it with
        the checkpoint in one transaction."""
        if batch and batch[0].seq <= self.last_seq:
            batch = [raw for raw in batch if raw.seq > self.last_seq]
        if not batch:
            return
        self._loaded = self.store.load_jobs(self._uncached(batch))
        rows = fold_batch(batch, self._job, self.workers.get, self.last_at, self.origin)
        self._loaded = {}
        try:
            self.store.write(rows)
        except BaseException:
            self.jobs.clear()
            self.workers = self.store.load_workers_all()
            raise
        self.last_seq, self.last_at = rows.last_seq, rows.last_at
        self.jobs.remember(rows.jobs)
        self.workers.update(rows.workers)

    def _job(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id) or self._loaded.get(job_id)

    def _uncached(self, batch: Iterable[Raw]) -> set[str]:
        """The ids of the jobs ``batch`` touches that are not in the cache."""
        prefix, cut = _JOB_SUBJECT, len(_JOB_SUBJECT)
        ids = {s[cut:s.rfind(".")] for s in (raw.subject for raw in batch)
               if s.startswith(prefix)}
        return {job_id for job_id in ids if job_id not in self.jobs}


_JOB_SUBJECT = f"{S.PREFIX}.job."  # jf.job.<id>.<type>
