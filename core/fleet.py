"""The sentinel's model of the world and its decisions. Pure: time and randomness come in
as arguments, I/O stays in the sentinel service, which appends what this returns.

``observe(event)`` folds the log into job states, workers and the scheduler, and marks the
jobs whose state changed as dirty; ``decide(job_id, now, rand)`` says what the log should
record next for one job; ``due(now, rand)`` finds what time has made necessary (a retry
whose delay is over, a worker silent for longer than its lease); ``dispatch(now)`` matches
ready jobs to free worker slots.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace

from jetflow.core.events import Event
from jetflow.core.job import TERMINAL, IllegalTransition, JobState, apply
from jetflow.core.plugin import PLUGIN_ROUTE, PluginRegistry, env_route, plugin_route
from jetflow.core.retry import DeadLetter, Retry, RetryPolicy, next_action, policy_for
from jetflow.core.scheduler import ReadyJob, Scheduler, WorkerSlots
from jetflow.core.workflow import Workflows

__all__ = ["Fleet", "WorkerInfo", "Append", "Dispatch"]

LEASE_GRACE_S = 3.0  # a heartbeat this long after a claim must list the job
# A worker that missed this many heartbeats (plus a quarter of an interval for transit
# and a busy event loop) is *silent*: it is offered nothing new, and the offers it has not
# claimed go to other workers at once. Its lease still decides when it is lost.
SILENT_AFTER_BEATS = 2.25
# An offer travels as a core NATS message, not stored: one that a heartbeat received this
# long after the offer was sent neither lists as running nor as held was lost (a cut
# connection), and is made again at once.
OFFER_SEEN_S = 1.0
# jobs a worker runs at once (its child processes) unless told: eight, as many threads as
# Dramatiq's worker processes have. Fewer in flight leave each worker waiting on round
# trips (its claim's ack, its child) with 4 at once, ~20% fewer jobs a second in
# ``make bench``; a child costs ~14 MB.
DEFAULT_CONCURRENCY = 8


def default_heartbeat_s(lease_s: float) -> float:
    """A worker's heartbeat interval when its ``joined`` event does not say (recorded
    before it did): what workers have always used, a quarter of the lease, at most 2 s."""
    return min(2.0, lease_s / 4)


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    handlers: frozenset[str]
    queues: frozenset[str]
    concurrency: int
    host: str = ""
    pid: int = 0
    status: str = "live"  # live | lost | left
    joined_seq: int = 0
    last_seq: int = 0
    last_seen: float = 0.0
    beat_at: float = 0.0  # the worker's clock when it built its last heartbeat
    beat_running: frozenset[str] = frozenset()
    heartbeat_s: float = 2.0
    silent: bool = False  # missed heartbeats: offered nothing new (see SILENT_AFTER_BEATS)
    draining: bool = False  # it said so in a heartbeat: offered nothing new either
    beat_held: frozenset[str] = frozenset()  # offers it holds, not claimed yet
    beat_seen: float = 0.0  # when the sentinel received its last readable heartbeat
    early_offers: bool = False  # it takes offers whose seq comes with an ack (see below)


@dataclass(frozen=True, slots=True)
class Append:
    """Record ``event``, provided the entity's last event is still ``expected_seq``."""

    event: Event
    expected_seq: int
    msg_id: str


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Offer a queued job to a worker; the worker's claim must expect ``seq``."""

    job: JobState
    worker_id: str
    seq: int


@dataclass
class Fleet:
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    queue_policies: dict[str, RetryPolicy] = field(default_factory=dict)
    lease_s: float = 15.0
    dispatch_timeout_s: float = 30.0
    jobs: dict[str, JobState] = field(default_factory=dict)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    known_handlers: set[str] = field(default_factory=set)
    sched: Scheduler = field(default_factory=Scheduler)
    dirty: set[str] = field(default_factory=set)
    last_seq: int = 0  # the latest event applied, from the tail or from an append's ack
    # Every event up to here was read from the log in order (the tail): the state covers
    # exactly that prefix when ``tail_seq >= last_seq`` (see :meth:`covers_prefix`).
    tail_seq: int = 0
    _ahead: set[int] = field(default_factory=set)  # applied from acks, the tail not there yet
    _timers: list[tuple[float, str]] = field(default_factory=list)
    _dispatched_at: dict[str, float] = field(default_factory=dict)
    _early: dict[str, str] = field(default_factory=dict)  # offered before stored: its worker
    _cancel_reasons: dict[str, str] = field(default_factory=dict)  # what a cancel said
    workflows: Workflows = field(default_factory=Workflows)
    # the registered workflow templates: name -> {version: sha256}
    template_digests: dict[str, dict[int, str]] = field(default_factory=dict)
    plugins: PluginRegistry = field(default_factory=PluginRegistry)

    # -- observing the log --------------------------------------------------------------
    def observe(self, event: Event, *, own: bool = False) -> str | None:
        """Apply one stored event; return why it was ignored, if it was. ``own``: an event
        this sentinel appended, applied from the append's ack, which may come after the
        tail has read the event (and what followed it: a job offered early can have run
        to its end by then); the tail applied it already, so it is not applied again (a
        finished job, forgotten, would be made anew by its ``submitted``)."""
        if own:
            if event.seq <= self.tail_seq:
                return None
            self._ahead.add(event.seq)  # the tail skips it (see :meth:`read_by_tail`)
        self.last_seq = max(self.last_seq, event.seq)
        if event.kind == "job":
            why = self._observe_job(event)
            if why is None:
                self.workflows.observe_job(event)
            return why
        if event.kind == "worker":
            self._observe_worker(event)
        elif event.kind == "wf":
            self._observe_wf(event)
        elif event.kind == "plugin":
            self.plugins.observe(event)
            if event.type in ("env_ready", "env_failed", "deployed"):
                self.grant_plugins()
        return None

    def grant_plugins(self, only: str | None = None) -> None:
        """The plugin routes each worker (or ``only`` that one) is offered beyond what it
        announced: every plugin's name for a worker that runs them all, and each version's
        environment a worker has built (or failed to build: its jobs fail there)."""
        for slots in self.sched.workers().values():
            if only is not None and slots.worker_id != only:
                continue
            info = self.workers.get(slots.worker_id)
            announced = info.handlers if info is not None else slots.handlers
            granted = set(announced)
            every = PLUGIN_ROUTE in announced
            for name, versions in self.plugins.versions.items():
                if every:
                    granted.add(plugin_route(name))
                if every or plugin_route(name) in announced:
                    granted |= {env_route(name, v.version) for v in versions.values()
                                if slots.worker_id in v.envs}
            slots.handlers = frozenset(granted)

    def _observe_wf(self, event: Event) -> None:
        if event.type == "registered":
            versions = self.template_digests.setdefault(str(event.data["name"]), {})
            versions[int(event.data["version"])] = str(event.data["sha256"])
            return
        self.workflows.observe_wf(event)

    def decide_workflows(self, now: float) -> list[Append]:
        """What the workflows that moved need appended next."""
        out: list[Append] = []

        def emit(event: Event, expected: int, msg_id: str) -> None:
            out.append(Append(event, expected, msg_id))

        def job_seq(job_id: str) -> int | None:
            job = self.jobs.get(job_id)
            return job.last_seq if job is not None and not job.terminal else None

        dirty, self.workflows.dirty = self.workflows.dirty, set()
        for workflow_id in dirty:
            self.workflows.decide(workflow_id, now, emit, job_seq)
        return out

    def _observe_job(self, event: Event) -> str | None:
        old = self.jobs.get(event.id) or JobState(event.id)
        if event.seq and event.seq <= old.last_seq:
            return None  # already applied (our own append, seen again in the tail)
        try:
            new = apply(old, event)
        except IllegalTransition as exc:
            self.stored_on_job(event.id, event.seq)
            return str(exc)
        self._update_scheduler(old, new, event)
        if event.type == "submitted":
            self.arm_timeouts(new)
        elif event.type == "cancel_requested" and isinstance(event.get("reason"), str):
            self._cancel_reasons[event.id] = event.data["reason"]
        # Dead letters stay known: an operator may re-drive them (queued again).
        if new.state in TERMINAL and new.state != "dead_lettered":
            self.jobs.pop(event.id, None)
            self._dispatched_at.pop(event.id, None)
            self._cancel_reasons.pop(event.id, None)
        else:
            self.jobs[event.id] = new
            self.dirty.add(event.id)
        return None

    def read_by_tail(self, seq: int) -> bool:
        """The tail, reading the log in order, is at ``seq``: whether to apply that event
        (False: it is this sentinel's, applied already from its append's ack; applied
        again, a job that ack's events ended and that was forgotten would come back)."""
        self.tail_seq = max(self.tail_seq, seq)
        if seq in self._ahead:
            self._ahead.discard(seq)
            return False
        if len(self._ahead) > 4096:  # seqs the tail will never read (aged out, say)
            self._ahead = {s for s in self._ahead if s > self.tail_seq}
        return True

    def covers_prefix(self) -> bool:
        """Whether the state is that of the log up to ``last_seq`` and nothing else: no
        append's ack applied ahead of events the tail has not read yet (a snapshot taken
        then, restored, would never see those events)."""
        return self.tail_seq >= self.last_seq

    def stored_on_job(self, job_id: str, seq: int) -> None:
        """A message the state machine did not apply (one published by hand) is still the
        latest on the job's subjects: the next append for the job must expect it, or it
        would conflict for ever and the job would be stuck."""
        job = self.jobs.get(job_id)
        if job is not None and seq > job.last_seq:
            self.jobs[job_id] = replace(job, last_seq=seq)
            self.dirty.add(job_id)

    def arm_timeouts(self, job: JobState) -> None:
        """Set the timers of the job's queue-wait and total limits."""
        if job.submitted_at is None:
            return
        for limit in (job.queue_timeout_s, job.deadline_s):
            if limit:
                heapq.heappush(self._timers, (job.submitted_at + limit, job.job_id))

    def _update_scheduler(self, old: JobState, new: JobState, event: Event) -> None:
        early = self._early.pop(new.job_id, None) if event.type == "submitted" else None
        if early is not None and new.state == "queued" \
                and self.sched.assigned_to(new.job_id) == early:
            return  # offered already, with the append (see :meth:`reserve_early`)
        if new.state == "queued" and event.type in ("queued", "submitted", "handed_back"):
            self.sched.add_ready(ReadyJob(new.job_id, new.queue, _route(new), new.priority,
                                          event.seq))
        elif new.state == "running" and event.type == "started":
            self.sched.occupy(new.job_id, event.data["worker"])
            self._dispatched_at.pop(new.job_id, None)
        elif new.state != old.state and new.state != "queued":
            self.sched.discard(new.job_id)
            self.sched.release(new.job_id)
            self._dispatched_at.pop(new.job_id, None)

    def _observe_worker(self, event: Event) -> None:
        wid = event.id
        if event.type == "joined":
            info = WorkerInfo(wid, frozenset(event.data["handlers"]),
                              frozenset(event.data["queues"]), event.data["concurrency"],
                              event.get("host", ""), event.get("pid", 0), "live",
                              event.seq, event.seq, event.at,
                              heartbeat_s=_heartbeat_interval(event, self.lease_s),
                              early_offers=event.get("early_offers") is True)
            old = self.workers.get(wid)
            if old is not None:
                info.last_seen = max(old.last_seen, info.last_seen)
            self.workers[wid] = info
            self.known_handlers |= info.handlers
            # Offers buffered in JF_WORK beyond the running slots (``prefetch``) keep a
            # worker busy across the sentinel's round trip; the claim stays exclusive.
            slots = info.concurrency + int(event.get("prefetch", 0))
            self.sched.add_worker(WorkerSlots(wid, info.handlers, info.queues, slots,
                                              early=info.early_offers))
            self.grant_plugins(only=wid)
            return
        known = self.workers.get(wid)
        if known is None:
            return
        known.status = event.type  # lost | left
        known.last_seq = event.seq
        self._requeue(self.sched.remove_worker(wid))
        self.dirty |= {j.job_id for j in self.jobs.values()
                       if j.state == "running" and j.worker == wid}

    def _requeue(self, job_ids: set[str]) -> None:
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            self._dispatched_at.pop(job_id, None)
            if job is not None and job.state == "queued":
                self.sched.add_ready(ReadyJob(job.job_id, job.queue, _route(job),
                                              job.priority, job.last_seq))

    def heartbeat(self, worker_id: str, at: float, beat_at: float = 0.0,
                  running: frozenset[str] | None = None, *,
                  held: frozenset[str] = frozenset(), draining: bool = False) -> None:
        """``at``: when the sentinel saw it; ``beat_at``, ``running`` (claimed), ``held``
        (offers not claimed yet) and ``draining``: what the worker said."""
        info = self.workers.get(worker_id)
        if info is None:
            return
        info.last_seen = max(info.last_seen, at)
        if running is not None and beat_at >= info.beat_at:
            info.beat_at, info.beat_running, info.beat_held = beat_at, running, held
            info.beat_seen = at
            if draining and not info.draining:
                info.draining = True
                self._stop_offering(info)
        if info.silent and info.status == "live":
            info.silent = False
            if not info.draining:
                self.sched.resume(worker_id)

    def cancel_reasons(self) -> dict[str, str]:
        return self._cancel_reasons

    def note_cancel_reason(self, job_id: str, reason: str) -> None:
        self._cancel_reasons[job_id] = reason

    def live_handlers(self) -> frozenset[str]:
        return frozenset(h for w in self.workers.values() if w.status == "live"
                         for h in w.handlers)

    # -- deciding -----------------------------------------------------------------------
    def decide(self, job_id: str, now: float, rand: float) -> Append | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.cancel_requested and job.state != "running":
            return self._job(job, "cancelled", now, job.attempt,
                             reason=self._cancel_reasons.get(job.job_id, "cancel requested"))
        expired = self._expired(job, now)
        if expired is not None:
            return expired
        if job.state == "submitted":
            return self._job(job, "queued", now, 1, attempt=1)
        if job.state in ("failed", "timed_out"):
            return self._after_failure(job, now, rand)
        if job.state == "retry_wait":
            return self._retry_due(job, now)
        if job.state == "running":
            return self._lease(job, now)
        return None

    def _lease(self, job: JobState, now: float) -> Append | None:
        """A running attempt whose worker is lost, or whose live worker's heartbeats,
        taken well after the claim, no longer list it, has lost its lease."""
        info = self.workers.get(job.worker or "")
        if info is None or info.status != "live":
            reason = f"worker {job.worker} lost"
        elif (job.started_at is not None and info.beat_at - job.started_at > LEASE_GRACE_S
              and job.job_id not in info.beat_running):
            reason = f"worker {job.worker} no longer runs this attempt"
        else:
            return None
        return self._job(job, "timed_out", now, job.attempt, attempt=job.attempt,
                         reason=reason, kind="lease")

    def _expired(self, job: JobState, now: float) -> Append | None:
        """The total deadline, or the queue-wait limit of a job that never started."""
        assert job.submitted_at is not None
        waited = now - job.submitted_at
        if job.deadline_s and waited >= job.deadline_s:
            reason = f"deadline of {job.deadline_s:g}s since submission passed"
            if job.state == "running":
                return self._job(job, "timed_out", now, job.attempt, attempt=job.attempt,
                                 reason=reason, kind="deadline")
            if job.state in ("queued", "retry_wait", "submitted"):
                return self._job(job, "dead_lettered", now, job.attempt, reason=reason,
                                 last_error=job.error)
        if (job.queue_timeout_s and job.state == "queued" and job.attempt == 0
                and waited >= job.queue_timeout_s):
            return self._job(job, "timed_out", now, 0, attempt=0, kind="queue",
                             reason=f"not started within {job.queue_timeout_s:g}s")
        return None

    def _after_failure(self, job: JobState, now: float, rand: float) -> Append:
        policy = policy_for(job, self.queue_policies.get(job.queue, self.policy))
        action = next_action(job, policy, rand)
        if isinstance(action, Retry):
            return self._job(job, "retry_scheduled", now, job.attempt + 1,
                             attempt=job.attempt + 1, not_before=now + action.delay_s,
                             delay_s=round(action.delay_s, 3))
        assert isinstance(action, DeadLetter)
        return self._job(job, "dead_lettered", now, job.attempt, reason=action.reason,
                         last_error=job.error)

    def _retry_due(self, job: JobState, now: float) -> Append | None:
        assert job.not_before is not None
        if now >= job.not_before:
            return self._job(job, "queued", now, job.attempt + 1, attempt=job.attempt + 1)
        heapq.heappush(self._timers, (job.not_before, job.job_id))
        return None

    def _worker_alive(self, worker_id: str | None) -> bool:
        info = self.workers.get(worker_id or "")
        return info is not None and info.status == "live"

    @staticmethod
    def _job(job: JobState, type_: str, now: float, nth: int, **data: object) -> Append:
        """An append for ``job``; ``nth`` (the attempt it concerns) makes its msg id."""
        event = Event("job", job.job_id, type_, now, dict(data))
        return Append(event, job.last_seq, f"{job.job_id}:{type_}:{nth}")

    def reconcile(self) -> None:
        """Look at every active job and workflow again (a safety net for decisions that
        were lost)."""
        self.dirty |= self.jobs.keys()
        self.workflows.reconcile()

    def due(self, now: float) -> tuple[set[str], list[Append]]:
        """Jobs whose timer fired (to decide again) and workers to declare lost; workers
        that fell silent are offered nothing more, and their unclaimed offers go back."""
        ready: set[str] = set()
        while self._timers and self._timers[0][0] <= now:
            ready.add(heapq.heappop(self._timers)[1])
        lost = [self._lost(w, now) for w in self.workers.values()
                if w.status == "live" and now - w.last_seen > self.lease_s]
        for w in self.workers.values():
            if w.status == "live" and not w.silent \
                    and now - w.last_seen > SILENT_AFTER_BEATS * w.heartbeat_s:
                w.silent = True
                self._stop_offering(w)
        for job_id, at in list(self._dispatched_at.items()):
            if now - at > self.dispatch_timeout_s or self._offer_lost(job_id, at):
                self._withdraw(job_id)
        return ready, lost

    def _stop_offering(self, w: WorkerInfo) -> None:
        """A silent or draining worker: nothing new for it, and its unclaimed offers go
        to other workers."""
        held = self.sched.pause(w.worker_id)
        for job_id in held & self._dispatched_at.keys():  # offered, not claimed
            self._withdraw(job_id)

    def _offer_lost(self, job_id: str, sent_at: float) -> bool:
        """Whether a heartbeat received well after the offer was sent says the worker has
        neither claimed it nor holds it."""
        info = self.workers.get(self.sched.assigned_to(job_id) or "")
        # built (the worker's clock) and received (ours) that long after: no clock skew
        # or a late read of the heartbeats makes a held offer look lost
        if info is None or min(info.beat_seen, info.beat_at) - sent_at < OFFER_SEEN_S:
            return False
        return job_id not in info.beat_running and job_id not in info.beat_held

    def _withdraw(self, job_id: str) -> None:
        """An offer that was not claimed: the job is ready for another worker."""
        self._early.pop(job_id, None)
        self.sched.release(job_id)
        self._requeue({job_id})

    def _lost(self, w: WorkerInfo, now: float) -> Append:
        event = Event("worker", w.worker_id, "lost", now,
                      {"reason": f"no heartbeat for {now - w.last_seen:.1f}s "
                                 f"(lease {self.lease_s:g}s)", "last_seen": w.last_seen})
        return Append(event, w.last_seq, f"worker:{w.worker_id}:lost:{w.joined_seq}")

    def reserve_early(self, job: JobState, now: float) -> str | None:
        """A worker to offer a new job to while its ``submitted`` is being appended, when
        one has a free slot and no ready job waits for it (an idle system): the offer goes
        out with the append, and the append's ack, which the worker gets too, says the
        sequence its claim must expect. When the append is observed the job stays offered
        (it is not made ready); when it fails, :meth:`cancel_early`. None: offer it the
        usual way, once it is observed."""
        if job.state != "queued" or job.job_id in self.jobs:
            return None
        worker_id = self.sched.reserve(job.job_id, job.queue, _route(job))
        if worker_id is not None:
            self._early[job.job_id] = worker_id
            self._dispatched_at[job.job_id] = now  # lost like any offer (see :meth:`due`)
        return worker_id

    def cancel_early(self, job_id: str) -> None:
        """The append of an early offer's ``submitted`` failed or was a duplicate: its
        slot is free again (the worker drops the offer when it sees the same ack)."""
        if self._early.pop(job_id, None) is not None:
            self.sched.release(job_id)
            self._dispatched_at.pop(job_id, None)

    def dispatch(self, now: float) -> list[Dispatch]:
        out = []
        for ready, worker_id in self.sched.dispatch():
            job = self.jobs.get(ready.job_id)
            if job is None or job.state != "queued":
                self.sched.release(ready.job_id)
                continue
            self._dispatched_at[job.job_id] = now
            out.append(Dispatch(job, worker_id, job.last_seq))
        return out


def _heartbeat_interval(joined: Event, lease_s: float) -> float:
    """The interval a ``joined`` event announces, else the default for its lease."""
    value = joined.get("heartbeat_s")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 3600:
        return float(value)
    lease = joined.get("lease_s")
    ok = isinstance(lease, int | float) and not isinstance(lease, bool) and lease > 0
    return default_heartbeat_s(float(lease) if ok else lease_s)


def _route(job: JobState) -> str:
    """What a worker must serve to be offered the job: its handler, or for a plugin job
    its plugin's route (or its version's environment's): see :meth:`Fleet.grant_plugins`."""
    pin = job.plugin
    if not pin:
        return job.handler
    if pin.get("env"):
        return env_route(job.handler, str(pin.get("version")))
    return plugin_route(job.handler)
