"""The sentinel's pure parts: the scheduler, the fleet model (observe/decide/due/dispatch),
the retry policy, submission intake and the reply book."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetflow.core import subjects as S
from jetflow.core.codec import decode_event, encode_event
from jetflow.core.events import FIELDS, Event
from jetflow.core.fleet import Append, Fleet
from jetflow.core.job import JobState, apply
from jetflow.core.retry import DeadLetter, Retry, RetryPolicy, compute_backoff, next_action
from jetflow.core.scheduler import ReadyJob, Scheduler, WorkerSlots
from jetflow.core.submission import MAX_SUBMISSION_BYTES, derive_job_id, submission_fingerprint
from jetflow.sentinel.intake import KEEP_BODY_BYTES, Intake, RawSubmission
from jetflow.sentinel.replies import ReplyBook

PROPERTY = settings(max_examples=200, deadline=None)


# == scheduler ==============================================================================

def slots(worker_id: str, handlers: set[str], queues: set[str] | None = None,
          concurrency: int = 1) -> WorkerSlots:
    return WorkerSlots(worker_id, frozenset(handlers), frozenset(queues or {"default"}),
                       concurrency)


def ready(job_id: str, priority: int = 0, order: int = 0, handler: str = "echo",
          queue: str = "default") -> ReadyJob:
    return ReadyJob(job_id, queue, handler, priority, order)


def ids(pairs: list[tuple[ReadyJob, str]]) -> list[str]:
    return [job.job_id for job, _ in pairs]


def test_strict_priority_then_fifo() -> None:
    s = Scheduler()
    for job_id, prio, order in [("low", 1, 1), ("hi-a", 9, 2), ("mid", 5, 3), ("hi-b", 9, 4),
                                ("low-b", 1, 5), ("zero", 0, 6)]:
        s.add_ready(ready(job_id, prio, order))
    s.add_worker(slots("w1", {"echo"}, concurrency=10))
    assert ids(s.dispatch()) == ["hi-a", "hi-b", "mid", "low", "low-b", "zero"]
    assert s.ready_count() == 0


def test_fifo_follows_order_not_insertion() -> None:
    s = Scheduler()
    s.add_ready(ready("later", 3, order=20))
    s.add_ready(ready("earlier", 3, order=10))
    s.add_worker(slots("w1", {"echo"}, concurrency=1))
    assert ids(s.dispatch()) == ["earlier"]


def test_priority_holds_across_handlers_and_queues_one_worker_serves() -> None:
    s = Scheduler()
    s.add_ready(ready("q1-echo", 2, 1, "echo", "q1"))
    s.add_ready(ready("q2-sleep", 7, 2, "sleep", "q2"))
    s.add_ready(ready("q1-sleep", 4, 3, "sleep", "q1"))
    s.add_worker(slots("w1", {"echo", "sleep"}, {"q1", "q2"}, concurrency=3))
    assert ids(s.dispatch()) == ["q2-sleep", "q1-sleep", "q1-echo"]


def test_capability_matching() -> None:
    s = Scheduler()
    s.add_ready(ready("echo-q1", 9, 1, "echo", "q1"))
    s.add_ready(ready("echo-q2", 9, 2, "echo", "q2"))
    s.add_ready(ready("sleep-q1", 9, 3, "sleep", "q1"))
    s.add_worker(slots("w-echo-q1", {"echo"}, {"q1"}, concurrency=5))
    assert s.dispatch() == [(ready("echo-q1", 9, 1, "echo", "q1"), "w-echo-q1")]
    s.add_worker(slots("w-sleep-q2", {"sleep"}, {"q2"}, concurrency=5))
    assert s.dispatch() == []  # has the handler of one, the queue of the other: neither
    s.add_worker(slots("w-all", {"echo", "sleep"}, {"q1", "q2"}, concurrency=5))
    assert sorted(ids(s.dispatch())) == ["echo-q2", "sleep-q1"]
    assert s.assigned_to("sleep-q1") == "w-all"
    assert s.handlers_available() == {"echo", "sleep"}


def test_a_job_without_a_free_worker_does_not_block_others() -> None:
    s = Scheduler()
    s.add_ready(ready("gpu-urgent", 9, 1, "gpu"))
    s.add_ready(ready("echo-low", 0, 2, "echo"))
    s.add_worker(slots("w1", {"echo"}))
    assert ids(s.dispatch()) == ["echo-low"]
    assert s.is_ready("gpu-urgent")
    s.add_worker(slots("w-gpu", {"gpu"}))
    assert s.dispatch() == [(ready("gpu-urgent", 9, 1, "gpu"), "w-gpu")]


def test_slots_are_respected() -> None:
    s = Scheduler()
    for i in range(5):
        s.add_ready(ready(f"j{i}", 0, i))
    s.add_worker(slots("w1", {"echo"}, concurrency=2))
    assert ids(s.dispatch()) == ["j0", "j1"]
    assert s.workers()["w1"].free == 0
    assert s.dispatch() == []  # full: nothing more, however many calls
    assert s.release("j0") == "w1"
    assert s.workers()["w1"].free == 1
    assert ids(s.dispatch()) == ["j2"]
    assert s.ready_count() == 2


def test_zero_concurrency_gets_nothing() -> None:
    s = Scheduler()
    s.add_ready(ready("j1"))
    s.add_worker(slots("w1", {"echo"}, concurrency=0))
    assert s.dispatch() == []
    assert s.is_ready("j1")


def test_release() -> None:
    s = Scheduler()
    s.add_worker(slots("w1", {"echo"}))
    s.add_ready(ready("j1"))
    s.dispatch()
    assert s.assigned_to("j1") == "w1"
    assert s.release("j1") == "w1"
    assert s.assigned_to("j1") is None
    assert s.release("j1") is None
    assert s.release("never-seen") is None
    assert not s.is_ready("j1")  # releasing a slot does not make the job ready again


def test_occupy_takes_a_slot_and_leaves_the_ready_set() -> None:
    s = Scheduler()
    s.add_worker(slots("w1", {"echo"}, concurrency=1))
    s.add_ready(ready("j1", 0, 1))
    s.add_ready(ready("j2", 0, 2))
    s.occupy("j1", "w1")  # seen running in the log before we dispatched it
    assert not s.is_ready("j1") and s.assigned_to("j1") == "w1"
    assert s.workers()["w1"].free == 0
    assert s.dispatch() == []
    s.occupy("j1", "w1")  # idempotent
    assert s.workers()["w1"].assigned == {"j1"}


def test_occupy_moves_a_job_dispatched_elsewhere() -> None:
    s = Scheduler()
    s.add_worker(slots("a", {"echo"}))
    s.add_ready(ready("j1"))
    assert s.dispatch() == [(ready("j1"), "a")]
    s.add_worker(slots("b", {"echo"}))
    s.occupy("j1", "b")  # a stale dispatch: b claimed it
    assert s.assigned_to("j1") == "b"
    assert s.workers()["a"].free == 1 and s.workers()["b"].free == 0


def test_occupy_on_an_unknown_worker_holds_no_slot() -> None:
    s = Scheduler()
    s.add_ready(ready("j1"))
    s.occupy("j1", "ghost")
    assert not s.is_ready("j1") and s.assigned_to("j1") is None


def test_add_ready_again_releases_the_slot() -> None:
    s = Scheduler()
    s.add_worker(slots("w1", {"echo"}))
    s.add_ready(ready("j1", 0, 1))
    assert ids(s.dispatch()) == ["j1"]
    s.add_ready(ready("j1", 0, 7))  # queued again (a retry): its old slot is free
    assert s.assigned_to("j1") is None and s.is_ready("j1")
    assert s.workers()["w1"].free == 1
    assert ids(s.dispatch()) == ["j1"]


def test_discard_is_lazy_but_final() -> None:
    s = Scheduler()
    s.add_ready(ready("j1", 9, 1))
    s.add_ready(ready("j2", 0, 2))
    s.discard("j1")  # cancelled while waiting
    s.add_worker(slots("w1", {"echo"}, concurrency=5))
    assert ids(s.dispatch()) == ["j2"]


def test_requeue_with_a_new_order_drops_the_stale_entry() -> None:
    s = Scheduler()
    s.add_ready(ready("j1", 5, 1))
    s.add_ready(ready("j1", 5, 10))  # the same job queued again
    s.add_ready(ready("j2", 5, 5))
    s.add_worker(slots("w1", {"echo"}, concurrency=5))
    assert ids(s.dispatch()) == ["j2", "j1"]  # j1 once, at its new place


def test_remove_worker_returns_held_jobs() -> None:
    s = Scheduler()
    s.add_worker(slots("w1", {"echo"}, concurrency=2))
    s.add_worker(slots("w2", {"echo"}, concurrency=2))
    for i in range(3):
        s.add_ready(ready(f"j{i}", 0, i))
    pairs = s.dispatch()
    held = {job.job_id for job, w in pairs if w == "w1"}
    assert s.remove_worker("w1") == held == {"j0", "j2"}  # one a round: j1 went to w2
    assert all(s.assigned_to(j) is None for j in held)
    assert "w1" not in s.workers()
    assert s.remove_worker("w1") == set()
    assert s.remove_worker("never") == set()
    assert s.assigned_to("j1") == "w2"


def test_a_few_jobs_spread_over_idle_workers_best_first() -> None:
    """Not one worker's slots (prefetch included) filled while another idles: one job a
    round to each worker, the emptiest first, each the best it can take."""
    s = Scheduler()
    s.add_worker(slots("w1", {"echo"}, concurrency=4))
    s.add_worker(slots("w2", {"echo"}, concurrency=4))
    for i in range(4):
        s.add_ready(ready(f"j{i}", 0, i))
    pairs = s.dispatch()
    assert [job.job_id for job, _ in pairs] == ["j0", "j1", "j2", "j3"]
    assert sorted(w for _, w in pairs) == ["w1", "w1", "w2", "w2"]
    s.release("j0")  # w1 holds none now, w2 two
    s.release("j2")
    s.add_ready(ready("top", 9, 10))
    s.add_ready(ready("next", 5, 11))
    assert [(job.job_id, w) for job, w in s.dispatch()] == [("top", "w1"), ("next", "w2")]


def test_worker_rejoin_keeps_its_jobs() -> None:
    s = Scheduler()
    s.add_worker(slots("w1", {"echo"}, concurrency=2))
    s.add_ready(ready("j1"))
    s.dispatch()
    s.add_worker(slots("w1", {"echo", "sleep"}, concurrency=2))
    assert s.workers()["w1"].assigned == {"j1"}
    assert s.workers()["w1"].free == 1


@st.composite
def scheduler_worlds(draw: st.DrawFn) -> tuple[list[ReadyJob], list[WorkerSlots]]:
    handlers = ["a", "b", "c"]
    queues = ["q1", "q2"]
    jobs = [ReadyJob(f"j{i}", draw(st.sampled_from(queues)), draw(st.sampled_from(handlers)),
                     draw(st.integers(0, 9)), draw(st.integers(0, 50)))
            for i in range(draw(st.integers(0, 25)))]
    workers = [WorkerSlots(f"w{i}",
                           frozenset(draw(st.sets(st.sampled_from(handlers), max_size=3))),
                           frozenset(draw(st.sets(st.sampled_from(queues), max_size=2))),
                           draw(st.integers(0, 4)))
               for i in range(draw(st.integers(0, 5)))]
    return jobs, workers


def better(a: ReadyJob, b: ReadyJob) -> bool:
    return (-a.priority, a.order, a.job_id) < (-b.priority, b.order, b.job_id)


def serves(w: WorkerSlots, job: ReadyJob) -> bool:
    return job.handler in w.handlers and job.queue in w.queues


@PROPERTY
@given(scheduler_worlds())
def test_dispatch_invariants(world: tuple[list[ReadyJob], list[WorkerSlots]]) -> None:
    jobs, workers = world
    s = Scheduler()
    for job in jobs:
        s.add_ready(job)
    for w in workers:
        s.add_worker(w)
    pairs = s.dispatch()
    by_id = {w.worker_id: w for w in workers}
    dispatched = [job.job_id for job, _ in pairs]
    assert len(dispatched) == len(set(dispatched))  # never twice
    for w in workers:
        mine = [job for job, wid in pairs if wid == w.worker_id]
        assert len(mine) <= w.concurrency  # slots
        assert all(serves(w, job) for job in mine)  # capability
        assert mine == sorted(mine, key=lambda j: (-j.priority, j.order, j.job_id))
    left = [job for job in jobs if job.job_id not in dispatched]
    assert s.ready_count() == len(left)
    for job in left:
        for w in workers:
            if serves(w, job):
                # nobody idles while a job it can run waits...
                assert by_id[w.worker_id].free == 0
                # ... and what it took was at least as good (strict priority, then FIFO)
                taken = [j for j, wid in pairs if wid == w.worker_id]
                assert all(better(t, job) for t in taken)
    assert s.dispatch() == []  # every slot that could be filled was


# == fleet ==================================================================================

class World:
    """Feeds a Fleet the way JF_EVENTS would: increasing sequences, and an append is
    stored only if the entity's last sequence is the one it expects."""

    def __init__(self, fleet: Fleet | None = None) -> None:
        self.fleet = fleet or Fleet()
        self.seq = 0
        self.last: dict[tuple[str, str], int] = {}

    def store(self, event: Event) -> Event:
        self.seq += 1
        stored = replace(event, seq=self.seq)
        # what the bus really does with an event: encode, store, decode
        stored = decode_event(S.event_subject(event.kind, event.id, event.type),
                              encode_event(stored), self.seq)
        self.last[(event.kind, event.id)] = self.seq
        self.fleet.tail_seq = self.seq  # read in order, as the sentinel's tail does
        assert self.fleet.observe(stored) is None
        return stored

    def commit(self, append: Append | None) -> Event:
        assert append is not None
        key = (append.event.kind, append.event.id)
        assert append.expected_seq == self.last.get(key, 0), "a stale append"
        return self.store(append.event)

    # the events other actors (workers, submitters) append
    def join(self, worker_id: str, handlers: list[str], queues: list[str] | None = None,
             concurrency: int = 1, at: float = 0.0, **more: Any) -> Event:
        return self.store(Event("worker", worker_id, "joined", at, {
            "handlers": handlers, "queues": queues or ["default"],
            "concurrency": concurrency, "host": "h", "pid": 1, **more}))

    def submit(self, job_id: str, at: float = 0.0, handler: str = "echo", priority: int = 0,
               max_attempts: int = 3, queue: str = "default") -> Event:
        return self.store(Event("job", job_id, "submitted", at, {
            "queue": queue, "handler": handler, "args": {}, "priority": priority,
            "max_attempts": max_attempts}))

    def queue(self, job_id: str, now: float, **submit: Any) -> Event:
        """Submit, then commit the sentinel's decision to queue it."""
        self.submit(job_id, at=now, **submit)
        append = self.fleet.decide(job_id, now, 0.5)
        assert append is not None and append.event.type == "queued"
        return self.commit(append)

    def start(self, job_id: str, worker_id: str, at: float) -> Event:
        job = self.fleet.jobs[job_id]
        return self.store(Event("job", job_id, "started", at, {
            "attempt": job.attempt + 1, "worker": worker_id, "lease_s": 15.0}))

    def fail(self, job_id: str, at: float, retryable: bool = True) -> Event:
        job = self.fleet.jobs[job_id]
        return self.store(Event("job", job_id, "failed", at, {
            "attempt": job.attempt, "error_type": "ValueError", "message": "boom",
            "retryable": retryable}))

    def succeed(self, job_id: str, at: float) -> Event:
        job = self.fleet.jobs[job_id]
        return self.store(Event("job", job_id, "succeeded", at, {
            "attempt": job.attempt, "worker": job.worker}))

    def beat(self, now: float) -> None:
        """Every live worker heartbeats (what a healthy fleet does every interval)."""
        for info in self.fleet.workers.values():
            if info.status == "live":
                self.fleet.heartbeat(info.worker_id, now)

    def run(self, job_id: str, now: float) -> str:
        """Dispatch the job and let the offered worker claim it; return that worker. The
        workers have been beating all along."""
        self.beat(now)
        offers = [d for d in self.fleet.dispatch(now) if d.job.job_id == job_id]
        assert len(offers) == 1
        assert offers[0].seq == self.last[("job", job_id)]
        self.start(job_id, offers[0].worker_id, now)
        return offers[0].worker_id


def no_jitter(**kw: Any) -> Fleet:
    return Fleet(policy=RetryPolicy(base_s=2.0, factor=2.0, cap_s=60.0, jitter=0.0), **kw)


def test_submitted_is_queued() -> None:
    w = World()
    w.join("w1", ["echo"])
    sub = w.submit("j1", at=1.0, priority=5)
    assert "j1" in w.fleet.dirty
    append = w.fleet.decide("j1", 2.0, 0.5)
    assert append is not None
    assert (append.event.kind, append.event.id, append.event.type) == ("job", "j1", "queued")
    assert append.event.data == {"attempt": 1}
    assert append.event.at == 2.0
    assert append.expected_seq == sub.seq
    assert append.msg_id == "j1:queued:1"
    queued = w.commit(append)
    assert w.fleet.jobs["j1"].state == "queued"
    assert w.fleet.sched.is_ready("j1")
    assert w.fleet.decide("j1", 3.0, 0.5) is None  # now it waits for a worker
    [offer] = w.fleet.dispatch(3.0)
    assert (offer.job.job_id, offer.worker_id, offer.seq) == ("j1", "w1", queued.seq)
    assert w.fleet.dispatch(3.0) == []  # offered once


def test_decide_on_an_unknown_job() -> None:
    assert Fleet().decide("nobody", 1.0, 0.5) is None


def test_failed_schedules_a_retry_then_requeues_when_due() -> None:
    w = World(no_jitter())
    w.join("w1", ["echo"])
    w.queue("j1", 1.0)
    w.run("j1", 2.0)
    failed = w.fail("j1", 3.0)
    append = w.fleet.decide("j1", 10.0, 0.5)
    assert append is not None and append.event.type == "retry_scheduled"
    assert append.event.data["attempt"] == 2
    assert append.event.data["not_before"] == 12.0  # 10 + base_s * factor**0
    assert append.expected_seq == failed.seq
    assert append.msg_id == "j1:retry_scheduled:2"
    w.commit(append)
    assert w.fleet.jobs["j1"].state == "retry_wait"
    assert not w.fleet.sched.is_ready("j1")
    assert w.fleet.decide("j1", 11.0, 0.5) is None  # not yet: sets a timer
    assert w.fleet.due(11.9) == (set(), [])
    ready, lost = w.fleet.due(12.0)
    assert ready == {"j1"} and lost == []
    requeue = w.fleet.decide("j1", 12.0, 0.5)
    assert requeue is not None and requeue.event.type == "queued"
    assert requeue.event.data == {"attempt": 2}
    assert requeue.msg_id == "j1:queued:2"
    w.commit(requeue)
    w.run("j1", 13.0)
    assert w.fleet.jobs["j1"].attempt == 2
    w.succeed("j1", 14.0)
    assert "j1" not in w.fleet.jobs  # terminal jobs are forgotten
    assert w.fleet.sched.workers()["w1"].free == 1


def test_second_backoff_is_longer() -> None:
    w = World(no_jitter())
    w.join("w1", ["echo"])
    w.queue("j1", 0.0)
    delays = []
    for _ in range(2):
        w.run("j1", 1.0)
        w.fail("j1", 1.0)
        append = w.fleet.decide("j1", 100.0, 0.5)
        assert append is not None and append.event.type == "retry_scheduled"
        delays.append(append.event.data["not_before"] - 100.0)
        w.commit(append)
        requeue = w.fleet.decide("j1", 1000.0, 0.5)
        w.commit(requeue)
    assert delays == [2.0, 4.0]


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_failed_is_dead_lettered_after_max_attempts(max_attempts: int) -> None:
    w = World(no_jitter())
    w.join("w1", ["echo"])
    w.queue("j1", 0.0, max_attempts=max_attempts)
    for attempt in range(1, max_attempts + 1):
        w.run("j1", float(attempt))
        w.fail("j1", float(attempt))
        append = w.fleet.decide("j1", 50.0 * attempt, 0.5)
        assert append is not None
        if attempt < max_attempts:
            assert append.event.type == "retry_scheduled"
            w.commit(append)
            w.commit(w.fleet.decide("j1", 1000.0 * attempt, 0.5))
    assert append.event.type == "dead_lettered"
    assert append.event.data["reason"] == f"gave up after {max_attempts} attempt(s): boom"
    assert append.msg_id == f"j1:dead_lettered:{max_attempts}"
    w.commit(append)
    assert w.fleet.decide("j1", 5000.0, 0.5) is None  # nothing more to do
    assert not w.fleet.sched.is_ready("j1") and w.fleet.dispatch(5000.0) == []


def test_a_dead_lettered_job_can_be_redriven() -> None:
    """core/job.py accepts ``queued`` after ``dead_lettered`` (a manual re-drive): the
    sentinel's model must then offer the job to a worker again."""
    w = World(no_jitter())
    w.join("w1", ["echo"])
    w.queue("j1", 0.0, max_attempts=1)
    w.run("j1", 1.0)
    w.fail("j1", 2.0)
    dead = w.commit(w.fleet.decide("j1", 3.0, 0.5))
    assert dead.type == "dead_lettered"
    assert w.fleet.decide("j1", 4.0, 0.5) is None and w.fleet.dispatch(4.0) == []
    w.store(Event("job", "j1", "queued", 10.0, {"attempt": 2}))  # observed without refusal
    [offer] = w.fleet.dispatch(11.0)
    assert offer.job.job_id == "j1" and offer.job.state == "queued"


def test_a_permanent_error_is_dead_lettered_at_once() -> None:
    w = World()
    w.join("w1", ["echo"])
    w.queue("j1", 0.0, max_attempts=5)
    w.run("j1", 1.0)
    w.fail("j1", 2.0, retryable=False)
    append = w.fleet.decide("j1", 3.0, 0.5)
    assert append is not None and append.event.type == "dead_lettered"
    assert append.event.data["reason"].startswith("permanent error")


def test_running_job_of_a_lost_worker_times_out() -> None:
    w = World(no_jitter(lease_s=5.0))
    w.join("w1", ["echo"], at=0.0)
    w.queue("j1", 0.0)
    w.run("j1", 1.0)
    assert w.fleet.decide("j1", 2.0, 0.5) is None  # running on a live worker
    w.fleet.dirty.clear()
    _, [lost] = w.fleet.due(10.0)
    w.commit(lost)
    assert "j1" in w.fleet.dirty
    append = w.fleet.decide("j1", 10.0, 0.5)
    assert append is not None and append.event.type == "timed_out"
    assert append.event.data["attempt"] == 1
    assert "w1" in append.event.data["reason"]
    assert append.msg_id == "j1:timed_out:1"
    w.commit(append)
    retry = w.fleet.decide("j1", 11.0, 0.5)
    assert retry is not None and retry.event.type == "retry_scheduled"


def test_worker_is_declared_lost_after_its_lease() -> None:
    w = World(Fleet(lease_s=5.0))
    joined = w.join("w1", ["echo"], at=100.0)
    assert w.fleet.due(105.0) == (set(), [])
    w.fleet.heartbeat("w1", 104.0)
    w.fleet.heartbeat("w1", 90.0)  # a late, older heartbeat changes nothing
    assert w.fleet.due(109.0) == (set(), [])  # exactly the lease: not yet
    _, [lost] = w.fleet.due(109.5)
    assert (lost.event.kind, lost.event.id, lost.event.type) == ("worker", "w1", "lost")
    assert lost.event.data["last_seen"] == 104.0
    assert "lease 5s" in lost.event.data["reason"]
    assert lost.expected_seq == joined.seq
    assert lost.msg_id == f"worker:w1:lost:{joined.seq}"
    assert set(FIELDS["worker"]["lost"]) <= set(lost.event.data)
    w.commit(lost)
    assert w.fleet.workers["w1"].status == "lost"
    assert w.fleet.live_handlers() == frozenset()
    assert w.fleet.due(500.0) == (set(), [])  # declared once


def test_heartbeat_of_an_unknown_worker_is_ignored() -> None:
    fleet = Fleet()
    fleet.heartbeat("ghost", 1.0)
    assert fleet.workers == {}


def test_queued_job_of_a_lost_worker_is_offered_again() -> None:
    w = World(Fleet(lease_s=5.0))
    w.join("w1", ["echo"], at=0.0)
    w.join("w2", ["echo"], at=0.0)
    w.queue("j1", 0.0)
    [offer] = w.fleet.dispatch(1.0)
    for other in {"w1", "w2"} - {offer.worker_id}:
        w.fleet.heartbeat(other, 9.0)
    _, [lost] = w.fleet.due(9.0)
    assert lost.event.id == offer.worker_id
    w.commit(lost)
    [again] = w.fleet.dispatch(9.0)
    assert again.job.job_id == "j1" and again.worker_id != offer.worker_id


def test_an_unclaimed_offer_is_withdrawn_after_the_dispatch_timeout() -> None:
    w = World(Fleet(lease_s=1000.0, dispatch_timeout_s=30.0))
    w.join("w1", ["echo"])
    w.queue("j1", 0.0)
    assert len(w.fleet.dispatch(1.0)) == 1
    w.beat(31.0)
    w.fleet.due(31.0)
    assert w.fleet.dispatch(31.0) == []  # not yet: exactly the timeout
    w.beat(31.5)
    w.fleet.due(31.5)
    [offer] = w.fleet.dispatch(32.0)
    assert offer.job.job_id == "j1"


def test_a_silent_worker_gets_nothing_new_and_its_unclaimed_offers_go_elsewhere() -> None:
    """A worker killed with -9 looks like the emptiest one: after its second missed
    heartbeat it is offered nothing, and what it was offered but did not claim is offered
    to a live worker at once (not after the lease or the dispatch timeout)."""
    w = World(Fleet(lease_s=15.0, dispatch_timeout_s=30.0))
    w.join("w1", ["echo"], concurrency=3, heartbeat_s=1.0)
    w.join("w2", ["echo"], concurrency=3, heartbeat_s=1.0)
    w.beat(10.0)
    w.queue("j1", 10.0)
    w.queue("j2", 10.0)
    offers = {d.job.job_id: d.worker_id for d in w.fleet.dispatch(10.0)}
    assert sorted(offers.values()) == ["w1", "w2"]  # one each: both look empty
    dead = offers["j2"]
    alive = ({"w1", "w2"} - {dead}).pop()
    w.fleet.heartbeat(alive, 11.0)
    w.fleet.heartbeat(alive, 12.0)
    assert w.fleet.due(12.2) == (set(), [])  # 2.2 intervals since its last beat
    assert w.fleet.dispatch(12.2) == []
    assert not w.fleet.workers[dead].silent
    assert w.fleet.due(12.3) == (set(), [])  # silent now, not lost: no event
    assert w.fleet.workers[dead].silent and w.fleet.workers[dead].status == "live"
    [again] = w.fleet.dispatch(12.3)
    assert (again.job.job_id, again.worker_id) == ("j2", alive)
    w.fleet.heartbeat(alive, 13.0)
    w.queue("j3", 13.0)
    w.queue("j4", 13.0)
    assert {d.worker_id for d in w.fleet.dispatch(13.0)} == {alive}  # room for one more
    assert w.fleet.sched.ready_count() == 1  # j4 waits for a live slot, not for the dead
    w.fleet.heartbeat(dead, 14.0)  # it was only slow: offers resume
    assert not w.fleet.workers[dead].silent
    [late] = w.fleet.dispatch(14.0)
    assert (late.job.job_id, late.worker_id) == ("j4", dead)


def test_a_silent_worker_keeps_its_running_attempts_until_its_lease() -> None:
    w = World(Fleet(lease_s=15.0))
    w.join("w1", ["echo"], heartbeat_s=1.0, at=0.0)
    w.queue("j1", 0.0)
    assert w.run("j1", 0.0) == "w1"
    w.fleet.heartbeat("w1", 1.0, beat_at=1.0, running=frozenset({"j1"}))
    assert w.fleet.due(5.0) == (set(), [])
    assert w.fleet.workers["w1"].silent
    assert w.fleet.decide("j1", 5.0, 0.5) is None  # still its attempt
    _, [lost] = w.fleet.due(16.5)  # the lease decides
    w.commit(lost)
    timed_out = w.fleet.decide("j1", 16.5, 0.5)
    assert timed_out is not None and timed_out.event.type == "timed_out"


@pytest.mark.parametrize(("joined", "interval"), [
    ({"heartbeat_s": 0.5, "lease_s": 15.0}, 0.5),
    ({"lease_s": 4.0}, 1.0),             # recorded before workers said: a quarter lease
    ({}, 2.0),                           # nor its lease: the sentinel's (15 s), at most 2 s
    ({"heartbeat_s": "soon", "lease_s": True}, 2.0),  # forged: the defaults
])
def test_the_heartbeat_interval_comes_from_the_joined_event(joined: dict[str, Any],
                                                            interval: float) -> None:
    w = World(Fleet(lease_s=15.0))
    w.join("w1", ["echo"], **joined)
    assert w.fleet.workers["w1"].heartbeat_s == interval


def test_dispatch_respects_priority() -> None:
    w = World()
    w.join("w1", ["echo"], concurrency=1)
    for job_id, prio in [("low", 1), ("hi-a", 9), ("mid", 5), ("hi-b", 9)]:
        w.queue(job_id, 0.0, priority=prio)
    order = []
    for t in range(1, 5):
        [offer] = w.fleet.dispatch(float(t))
        order.append(offer.job.job_id)
        w.start(offer.job.job_id, offer.worker_id, float(t))
        w.succeed(offer.job.job_id, float(t))
    assert order == ["hi-a", "hi-b", "mid", "low"]
    assert w.fleet.dispatch(9.0) == []


def test_dispatch_matches_handlers() -> None:
    w = World()
    w.join("w-echo", ["echo"], concurrency=4)
    w.queue("j-sleep", 0.0, handler="sleep", priority=9)
    w.queue("j-echo", 0.0, handler="echo")
    assert [(d.job.job_id, d.worker_id) for d in w.fleet.dispatch(1.0)] == \
        [("j-echo", "w-echo")]
    w.join("w-sleep", ["sleep"])
    assert [(d.job.job_id, d.worker_id) for d in w.fleet.dispatch(2.0)] == \
        [("j-sleep", "w-sleep")]
    assert w.fleet.known_handlers == {"echo", "sleep"}


def test_cancel_requested_before_running_cancels() -> None:
    w = World()
    w.queue("j1", 0.0)
    w.store(Event("job", "j1", "cancel_requested", 1.0, {}))
    append = w.fleet.decide("j1", 2.0, 0.5)
    assert append is not None and append.event.type == "cancelled"
    w.commit(append)
    assert "j1" not in w.fleet.jobs and not w.fleet.sched.is_ready("j1")


def test_observe_ignores_what_it_has_seen_and_reports_illegal_events() -> None:
    w = World()
    sub = w.submit("j1")
    assert w.fleet.observe(sub) is None  # the same event again (our own append)
    assert w.fleet.jobs["j1"].events == 1
    bad = Event("job", "j1", "succeeded", 1.0, {"attempt": 1, "worker": "w"}, seq=99)
    reason = w.fleet.observe(bad)
    assert reason is not None and "succeeded" in reason
    assert w.fleet.jobs["j1"].state == "submitted"
    assert w.fleet.last_seq == 99


def test_reconcile_marks_every_active_job() -> None:
    w = World()
    w.submit("j1")
    w.submit("j2")
    w.fleet.dirty.clear()
    w.fleet.reconcile()
    assert w.fleet.dirty == {"j1", "j2"}


# == retry policy ===========================================================================

@PROPERTY
@given(st.integers(1, 100), st.floats(0.0, 1.0))
def test_backoff_without_jitter_is_monotone_and_capped(attempt: int, rand: float) -> None:
    policy = RetryPolicy(base_s=0.5, factor=2.0, cap_s=300.0, jitter=0.0)
    d1 = compute_backoff(attempt, policy, rand)
    d2 = compute_backoff(attempt + 1, policy, rand)
    assert 0.5 <= d1 <= d2 <= 300.0
    assert d1 == min(300.0, 0.5 * 2.0 ** (attempt - 1))


def test_backoff_values() -> None:
    policy = RetryPolicy(base_s=1.0, factor=2.0, cap_s=10.0, jitter=0.0)
    assert [compute_backoff(a, policy, 0.3) for a in range(0, 7)] == \
        [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_is_capped_for_any_attempt() -> None:
    """Attempts are bounded by max_attempts (at most 100) today, but the policy itself
    must not blow up on a large attempt number."""
    policy = RetryPolicy(base_s=1.0, factor=2.0, cap_s=300.0, jitter=0.2)
    assert compute_backoff(5000, policy, 1.0) == 300.0
    assert compute_backoff(5000, policy, 0.0) == pytest.approx(240.0)


@PROPERTY
@given(st.integers(1, 60), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_backoff_jitter_bounds(attempt: int, rand: float, jitter: float) -> None:
    policy = RetryPolicy(base_s=1.0, factor=2.0, cap_s=300.0, jitter=jitter)
    raw = min(300.0, 2.0 ** (attempt - 1))
    delay = compute_backoff(attempt, policy, rand)
    assert raw * (1 - jitter) - 1e-9 <= delay <= min(300.0, raw * (1 + jitter)) + 1e-9
    assert delay >= 0.0


def test_backoff_jitter_ends() -> None:
    policy = RetryPolicy(base_s=10.0, factor=2.0, cap_s=300.0, jitter=0.2)
    assert compute_backoff(1, policy, 0.0) == pytest.approx(8.0)
    assert compute_backoff(1, policy, 0.5) == pytest.approx(10.0)
    assert compute_backoff(1, policy, 1.0) == pytest.approx(12.0)
    assert compute_backoff(9, policy, 1.0) == 300.0  # jitter never passes the cap


def test_next_action() -> None:
    policy = RetryPolicy(jitter=0.0)
    job = JobState("j1", state="failed", attempt=1, max_attempts=3,
                   error={"message": "boom", "retryable": True})
    assert next_action(job, policy, 0.5) == Retry(1.0)
    assert next_action(replace(job, attempt=2), policy, 0.5) == Retry(2.0)
    assert next_action(replace(job, attempt=3), policy, 0.5) == \
        DeadLetter("gave up after 3 attempt(s): boom")
    permanent = replace(job, error={"message": "bad input", "retryable": False})
    assert next_action(permanent, policy, 0.5) == DeadLetter("permanent error: bad input")
    assert isinstance(next_action(replace(job, error=None), policy, 0.5), Retry)


# == intake =================================================================================

EPOCH = "epoch-1"
KNOWN = {"echo", "sleep"}


def raw(body: Any, seq: int = 1, subject: str = "jf.submit.default",
        headers: dict[str, str] | None = None) -> RawSubmission:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return RawSubmission(subject, data, headers or {}, seq)


def check_event(event: Event) -> JobState:
    """The event is valid on the wire and applies to a new job."""
    subject = S.job_subject(event.id, event.type)
    assert decode_event(subject, encode_event(event)) == event
    return apply(JobState(event.id), event)


def test_a_valid_body_is_submitted() -> None:
    r = raw({"handler": "echo", "args": {"x": 1}, "priority": 5}, seq=7,
            headers={"traceparent": "00-abc-def-01", "other": "x"})
    d = Intake(EPOCH).decide(r, KNOWN, 100.0)
    assert d.accepted
    job_id = derive_job_id(None, EPOCH, 7)
    assert d.derived_id == job_id
    a = d.append
    assert a.expected_seq == 0
    assert a.msg_id == f"{job_id}:submitted"
    assert (a.event.kind, a.event.id, a.event.type, a.event.at) == \
        ("job", job_id, "submitted", 100.0)
    assert a.event.data["queue"] == "default" and a.event.data["handler"] == "echo"
    assert a.event.data["args"] == {"x": 1} and a.event.data["priority"] == 5
    assert a.event.data["max_attempts"] == 3 and a.event.data["submit_seq"] == 7
    assert a.event.data["correlation_id"] == job_id
    assert d.fingerprint == submission_fingerprint(r.subject, None, r.data)
    assert a.event.data["fp"] == d.fingerprint
    assert d.headers == {S.HDR_CORRELATION_ID: job_id, S.HDR_TRACEPARENT: "00-abc-def-01"}
    assert a.event.data["queued"] is True  # queued for attempt 1 in the same event
    state = check_event(a.event)
    assert state.state == "queued" and state.priority == 5 and state.attempt == 0


def test_the_submitters_job_id_and_msg_id() -> None:
    intake = Intake(EPOCH)
    mine = intake.decide(raw({"handler": "echo", "job_id": "order-42"}), KNOWN, 1.0)
    assert mine.accepted and mine.append.event.id == "order-42"
    by_msg = [intake.decide(raw({"handler": "echo"}, seq=s, headers={S.HDR_MSG_ID: "m-1"}),
                            KNOWN, 1.0) for s in (1, 2)]
    assert by_msg[0].append.event.id == by_msg[1].append.event.id == \
        derive_job_id("m-1", "other-epoch", 99)


def test_correlation_id_from_body_or_header() -> None:
    intake = Intake(EPOCH)
    d = intake.decide(raw({"handler": "echo", "correlation_id": "c-body"},
                          headers={S.HDR_CORRELATION_ID: "c-hdr"}), KNOWN, 1.0)
    assert d.append.event.data["correlation_id"] == "c-body"
    d = intake.decide(raw({"handler": "echo"}, headers={S.HDR_CORRELATION_ID: "c-hdr"}),
                      KNOWN, 1.0)
    assert d.append.event.data["correlation_id"] == "c-hdr"
    assert d.headers[S.HDR_CORRELATION_ID] == "c-hdr"


def rejected(body: Any, **kw: Any) -> Event:
    d = Intake(EPOCH).decide(raw(body, **kw), KNOWN, 5.0)
    assert not d.accepted
    assert d.append.expected_seq == 0
    assert d.append.event.type == "rejected"
    state = check_event(d.append.event)
    assert state.state == "rejected"
    assert state.error is not None and state.error["code"] == d.append.event.data["code"]
    return d.append.event


def test_unknown_handler_is_rejected() -> None:
    e = rejected({"handler": "nope"}, seq=3)
    assert e.data["code"] == "unknown_handler"
    assert "'nope'" in e.data["reason"] and "echo" in e.data["reason"]
    assert e.data["body"] == '{"handler":"nope"}'
    assert e.data["queue"] == "default" and e.data["submit_seq"] == 3
    assert e.id == derive_job_id(None, EPOCH, 3)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_object"),
        ({"args": {}}, "missing_field"),
        ({"handler": "echo", "colour": "red"}, "unknown_field"),
        ({"handler": "echo", "priority": "5"}, "bad_field"),
        ({"handler": "echo", "job_id": "a.b"}, "bad_job_id"),
        ({"workflow": "etl"}, "unknown_workflow"),
        ({"workflow": "etl", "handler": "echo"}, "unknown_field"),
        ({"workflow": "no way"}, "bad_field"),
    ],
)
def test_a_bad_body_is_rejected_with_code_and_reason(body: Any, code: str) -> None:
    e = rejected(body, seq=11)
    assert e.data["code"] == code
    assert e.data["reason"]
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    assert e.data["body"] == data.decode()
    assert e.data["body_bytes"] == len(data)
    assert e.id == derive_job_id(None, EPOCH, 11)  # no usable id of its own


def test_a_bad_body_with_a_valid_job_id_is_rejected_under_that_id() -> None:
    e = rejected({"handler": "echo", "job_id": "mine-1", "priority": 10})
    assert e.id == "mine-1" and e.data["code"] == "bad_field"
    e = rejected({"handler": "nope", "job_id": "mine-2"})
    assert e.id == "mine-2" and e.data["code"] == "unknown_handler"


def test_a_rejection_names_the_handler_a_readable_body_names() -> None:
    e = rejected({"handler": "nope", "args": {}})
    assert e.data["handler"] == "nope" and check_event(e).handler == "nope"
    e = rejected({"handler": "echo", "priority": "5"})
    assert e.data["handler"] == "echo" and check_event(e).handler == "echo"
    for body in (b"{not json", {"args": {}}, {"handler": "a b"}, {"handler": 5}):
        e = rejected(body)
        assert "handler" not in e.data and check_event(e).handler == "", body


def test_rejection_msg_id_includes_the_stream_sequence() -> None:
    d = Intake(EPOCH).decide(raw({"handler": "nope", "job_id": "x"}, seq=42), KNOWN, 1.0)
    assert d.append.msg_id == "x:rejected:42"


def test_an_oversized_body_is_rejected_and_truncated() -> None:
    body = orjson.dumps({"handler": "echo", "job_id": "big",
                         "args": {"pad": "é" * MAX_SUBMISSION_BYTES}})
    e = rejected(body)
    assert e.data["code"] == "too_large"
    assert e.data["body_bytes"] == len(body)
    kept = e.data["body"]
    assert len(kept.encode()) <= KEEP_BODY_BYTES + 3  # a cut character becomes U+FFFD
    assert kept.startswith('{"handler":"echo","job_id":"big"')
    assert e.id == derive_job_id(None, EPOCH, 1)  # too big to be read for an id


def test_binary_garbage_is_kept_readably() -> None:
    e = rejected(b"\xff\xfe\x00garbage")
    assert e.data["code"] == "invalid_json"
    assert "garbage" in e.data["body"]


def test_a_bad_submit_subject_is_rejected() -> None:
    e = rejected({"handler": "echo"}, subject="jf.submit.a.b")
    assert e.data["code"] == "bad_subject"
    assert e.data["queue"] == "" and e.data["subject"] == "jf.submit.a.b"


@PROPERTY
@given(st.binary(max_size=200), st.sampled_from(["jf.submit.default", "jf.submit.q-2"]),
       st.integers(1, 10**9))
def test_intake_always_produces_a_valid_event(data: bytes, subject: str, seq: int) -> None:
    d = Intake(EPOCH).decide(RawSubmission(subject, data, {}, seq), KNOWN, 1.0)
    assert d.append.expected_seq == 0
    check_event(d.append.event)
    assert S.check_token(d.append.event.id)


# == replies ================================================================================

def test_reply_when_the_request_comes_first() -> None:
    book = ReplyBook()
    assert book.expect("fp1", "_INBOX.a") is None
    assert book.answer("fp1", b'{"job_id":"j1"}') == ["_INBOX.a"]
    assert book.answer("fp1", b'{"job_id":"j1"}') == []  # nobody waits any more


def test_reply_when_the_event_comes_first() -> None:
    book = ReplyBook()
    assert book.answer("fp1", b'{"job_id":"j1"}') == []
    assert book.expect("fp1", "_INBOX.a") == b'{"job_id":"j1"}'
    assert book.expect("fp1", "_INBOX.b") is None  # the answer was given once


def test_several_requests_for_one_submission_are_answered_in_order() -> None:
    book = ReplyBook()
    book.expect("fp", "_INBOX.1")
    book.expect("fp", "_INBOX.2")
    book.expect("other", "_INBOX.3")
    assert book.answer("fp", b"{}") == ["_INBOX.1"]
    assert book.answer("fp", b"{}") == ["_INBOX.2"]
    assert book.answer("other", b"{}") == ["_INBOX.3"]


def test_an_event_seen_twice_is_answered_once() -> None:
    """A sentinel sees its append and then reads it back: the second sight must not answer
    another request of the same body (another submission, with its own job id)."""
    book = ReplyBook()
    book.expect("fp", "_INBOX.1")
    assert book.answer("fp", b'{"job_id":"j1"}', seq=7) == ["_INBOX.1"]
    assert book.answer("fp", b'{"job_id":"j1"}', seq=7) == []  # read back: nobody
    assert book.expect("fp", "_INBOX.2") is None  # its own answer is still to come
    assert book.answer("fp", b'{"job_id":"j2"}', seq=8) == ["_INBOX.2"]


def test_an_early_answer_is_only_for_a_request_on_its_way() -> None:
    """Without a msg id, an answer that came before its request is given within a moment;
    later, the same body is another submission (a plain publish, another sentinel's
    append) and must wait for its own event."""
    from unittest import mock

    from jetflow.sentinel import replies

    book = ReplyBook()
    with mock.patch.object(replies.time, "monotonic", return_value=100.0):
        book.answer("fp", b'{"job_id":"j1"}', seq=1)
    with mock.patch.object(replies.time, "monotonic", return_value=100.5):
        assert book.expect("fp", "_INBOX.on-its-way") == b'{"job_id":"j1"}'
    with mock.patch.object(replies.time, "monotonic", return_value=200.0):
        book.answer("fp", b'{"job_id":"j2"}', seq=2)
    with mock.patch.object(replies.time, "monotonic", return_value=200.0 + 5):
        assert book.expect("fp", "_INBOX.later") is None
    with mock.patch.object(replies.time, "monotonic", return_value=200.0 + 6):
        assert book.answer("fp", b'{"job_id":"j3"}', seq=3) == ["_INBOX.later"]
    book.answer("fp2", b'{"job_id":"j4"}', seq=4, keep=False)  # catching up: nothing kept
    assert book.expect("fp2", "_INBOX.new") is None


def test_repeats_of_a_msg_id_submission_all_get_the_answer() -> None:
    book = ReplyBook()
    book.expect("fp", "_INBOX.gave-up")  # a request the client re-asked
    book.expect("fp", "_INBOX.retry")
    assert book.answer("fp", b"{}", everyone=True) == ["_INBOX.gave-up", "_INBOX.retry"]
    assert book.expect("fp", "_INBOX.later") == b"{}"
    assert book.expect("fp", "_INBOX.again") == b"{}"


def test_reply_bodies() -> None:
    ok = Event("job", "j1", "submitted", 1.0, {})
    assert orjson.loads(ReplyBook.body_for(ok)) == {"job_id": "j1"}
    assert orjson.loads(ReplyBook.body_for(ok, duplicate=True)) == \
        {"job_id": "j1", "duplicate": True}
    no = Event("job", "j2", "rejected", 1.0, {"reason": "unknown handler", "code": "x"})
    assert orjson.loads(ReplyBook.body_for(no)) == \
        {"error": "unknown handler", "code": "x", "job_id": "j2"}


def test_an_offer_a_later_heartbeat_neither_runs_nor_holds_was_lost() -> None:
    """Offers are core NATS messages: one lost on the way is made again once a heartbeat
    built and received a second after it says the worker has not got it."""
    w = World(Fleet(lease_s=15.0, dispatch_timeout_s=30.0))
    w.join("w1", ["echo"], concurrency=2, heartbeat_s=1.0)
    w.beat(10.0)
    w.queue("kept", 10.0)
    w.queue("lost", 10.0)
    assert {d.job.job_id for d in w.fleet.dispatch(10.0)} == {"kept", "lost"}
    w.fleet.heartbeat("w1", 10.5, 10.5, frozenset(), held=frozenset())  # too soon to tell
    w.fleet.due(10.6)
    assert w.fleet.dispatch(10.6) == []
    w.fleet.heartbeat("w1", 11.2, 11.2, frozenset(), held=frozenset({"kept"}))
    w.fleet.due(11.3)
    [again] = w.fleet.dispatch(11.3)
    assert again.job.job_id == "lost"


def test_a_draining_worker_gets_nothing_new_and_its_unclaimed_offers_go_elsewhere() -> None:
    w = World(Fleet(lease_s=15.0))
    w.join("w1", ["echo"], concurrency=1, heartbeat_s=1.0)
    w.join("w2", ["echo"], concurrency=1, heartbeat_s=1.0)
    w.beat(10.0)
    w.queue("j1", 10.0)
    [offer] = w.fleet.dispatch(10.0)
    other = ({"w1", "w2"} - {offer.worker_id}).pop()
    w.fleet.heartbeat(offer.worker_id, 10.1, 10.1, frozenset(), draining=True)
    [again] = w.fleet.dispatch(10.2)
    assert (again.job.job_id, again.worker_id) == ("j1", other)
    w.queue("j2", 10.3)
    w.fleet.heartbeat(other, 10.3, 10.3, frozenset({"j1"}))
    w.start("j1", other, 10.3)
    assert w.fleet.dispatch(10.4) == []  # the draining one has a free slot: not offered


def test_kept_answers_hold_their_own_size_not_the_encoders_buffer() -> None:
    """A minute of answers is kept: each must cost its size (orjson's bytes hold 4 KiB)."""
    import tracemalloc

    book = ReplyBook()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            book.answer(f"fp{i}", ReplyBook.body_for(Event("job", f"j{i}", "submitted", 1.0,
                                                           {})), seq=i + 1)
        per_answer = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    assert per_answer < 1024, per_answer
