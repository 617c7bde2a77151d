"""Early offers, in the pure core: a new job offered to an idle worker while its
``submitted`` is being appended (the sentinel's :meth:`Fleet.reserve_early`), kept
offered once it is observed, freed when the append fails, lost like any offer."""

from __future__ import annotations

from dataclasses import replace

from jetflow.core.events import Event
from jetflow.core.fleet import Fleet
from jetflow.core.job import JobState, apply
from jetflow.core.retry import RetryPolicy
from jetflow.core.scheduler import ReadyJob, Scheduler, WorkerSlots
from jetflow.core.snapshot import restore, take
from tests.test_scheduler_fleet import World


def new_job(job_id: str, at: float = 1.0, priority: int = 0, handler: str = "echo",
            queue: str = "default") -> Event:
    """A ``submitted`` as the intake makes it (v2: queued at once), not stored yet."""
    return Event("job", job_id, "submitted", at, {
        "queue": queue, "handler": handler, "args": {}, "priority": priority,
        "max_attempts": 3, "queued": True})


def state(event: Event) -> JobState:
    return apply(JobState(event.id), event)


def test_scheduler_reserves_on_the_emptiest_free_worker_that_serves_it() -> None:
    s = Scheduler()
    s.add_worker(WorkerSlots("busy", frozenset({"echo"}), frozenset({"default"}), 2, early=True))
    s.add_worker(WorkerSlots("idle", frozenset({"echo"}), frozenset({"default"}), 2, early=True))
    s.add_worker(WorkerSlots("other", frozenset({"sleep"}), frozenset({"default"}), 9,
                               early=True))
    s.occupy("running", "busy")
    assert s.reserve("j1", "default", "echo") == "idle"
    assert s.assigned_to("j1") == "idle"
    assert s.reserve("j1", "default", "echo") is None  # once
    assert s.reserve("j2", "other-queue", "echo") is None  # nobody serves that queue
    assert s.reserve("j3", "default", "nobody") is None
    assert s.reserve("j4", "default", "echo") in {"busy", "idle"}
    assert s.reserve("j5", "default", "echo") in {"busy", "idle"}
    assert s.reserve("j6", "default", "echo") is None  # all four slots taken
    assert {w.worker_id: w.free for w in s.workers().values()} == \
        {"busy": 0, "idle": 0, "other": 9}


def test_scheduler_does_not_reserve_past_a_ready_job_or_a_paused_worker() -> None:
    """Strict priority: a ready job the worker could take goes first, the usual way."""
    s = Scheduler()
    s.add_worker(WorkerSlots("w1", frozenset({"echo"}), frozenset({"default"}), 4, early=True))
    s.add_ready(ReadyJob("waiting", "default", "echo", 0, 1))
    assert s.reserve("new", "default", "echo") is None
    assert [job.job_id for job, _ in s.dispatch()] == ["waiting"]
    assert s.reserve("new", "default", "echo") == "w1"
    s.pause("w1")
    assert s.reserve("newer", "default", "echo") is None


def test_an_early_offer_stays_offered_once_its_submitted_is_observed() -> None:
    w = World()
    w.join("w1", ["echo"], concurrency=2, early_offers=True)
    event = new_job("j1")
    assert w.fleet.reserve_early(state(event), 1.0) == "w1"
    assert w.fleet.dispatch(1.0) == []  # not ready: nothing to offer again
    stored = w.store(event)  # the append's ack (or the tail) shows it stored
    job = w.fleet.jobs["j1"]
    assert job.state == "queued" and job.last_seq == stored.seq
    assert not w.fleet.sched.is_ready("j1")
    assert w.fleet.sched.assigned_to("j1") == "w1"
    assert w.fleet.dispatch(2.0) == []  # offered once
    w.start("j1", "w1", 2.0)  # the worker claims with the seq the ack said
    assert w.fleet.jobs["j1"].state == "running"
    assert w.fleet.sched.workers()["w1"].free == 1


def test_an_ack_that_comes_after_the_tail_saw_the_job_end_does_not_make_it_anew() -> None:
    """Offered early, the job can run to its end, and the tail read all of it, before the
    sentinel reads its own append's ack: applying that ``submitted`` again would make the
    finished (forgotten) job queued, and offer it once more."""
    w = World()
    w.join("w1", ["echo"], concurrency=1, early_offers=True)
    event = new_job("j1")
    assert w.fleet.reserve_early(state(event), 1.0) == "w1"
    stored = w.store(event)  # the tail: submitted, started, succeeded
    w.start("j1", "w1", 1.1)
    w.succeed("j1", 1.2)
    assert "j1" not in w.fleet.jobs and w.fleet.covers_prefix()
    assert w.fleet.observe(stored, own=True) is None  # the ack, read last
    assert "j1" not in w.fleet.jobs
    assert w.fleet.dispatch(2.0) == []
    assert w.fleet.sched.workers()["w1"].free == 1


def test_the_tail_skips_what_acks_applied_ahead_of_it_even_for_a_job_they_ended() -> None:
    """The sentinel's ``submitted`` and then its ``cancelled`` applied from their acks
    before the tail reads either: the tail skips both (read again, the ``submitted`` of
    the forgotten job would make it queued and offer it)."""
    w = World()
    w.join("w1", ["echo"], concurrency=1)
    submitted = replace(new_job("j1"), seq=w.seq + 1)
    cancelled = Event("job", "j1", "cancelled", 2.0, {"reason": "by hand"}, seq=w.seq + 2)
    assert w.fleet.observe(submitted, own=True) is None
    assert w.fleet.observe(cancelled, own=True) is None
    assert "j1" not in w.fleet.jobs and not w.fleet.covers_prefix()
    assert not w.fleet.read_by_tail(submitted.seq)
    assert not w.fleet.read_by_tail(cancelled.seq)
    assert w.fleet.covers_prefix() and "j1" not in w.fleet.jobs
    assert w.fleet.read_by_tail(cancelled.seq + 1)  # someone else's: applied


def test_an_ack_read_before_the_tail_is_applied_and_the_state_covers_no_prefix() -> None:
    """An append's ack is applied as soon as it is read, ahead of events of other jobs
    the tail has not read yet: until the tail passes it, the state is no snapshot of a
    prefix of the log (a sentinel restored from one would never see those events)."""
    w = World()
    w.join("w1", ["echo"], concurrency=2)
    w.fleet.tail_seq = w.seq  # the tail is here; the next two are not read yet
    w.seq += 1  # another job's event, stored, not read
    own = replace(new_job("j2"), seq=w.seq + 1)
    w.seq += 1
    assert w.fleet.observe(own, own=True) is None
    assert w.fleet.jobs["j2"].state == "queued" and not w.fleet.covers_prefix()
    w.fleet.tail_seq = own.seq  # the tail read both
    assert w.fleet.covers_prefix()
    doc = take(w.fleet, tip="", stream_created="")
    assert restore(doc, policy=RetryPolicy(), queue_policies={}, lease_s=10).covers_prefix()


def test_a_failed_or_duplicate_append_frees_the_slot() -> None:
    w = World()
    w.join("w1", ["echo"], concurrency=1, early_offers=True)
    assert w.fleet.reserve_early(state(new_job("j1")), 1.0) == "w1"
    assert w.fleet.reserve_early(state(new_job("j2")), 1.0) is None  # its one slot
    w.fleet.cancel_early("j1")
    assert w.fleet.sched.workers()["w1"].free == 1
    assert w.fleet.reserve_early(state(new_job("j2")), 1.0) == "w1"
    w.fleet.cancel_early("nobody")  # not early: nothing happens
    assert w.fleet.sched.assigned_to("j2") == "w1"


def test_a_submitted_observed_after_its_offer_was_withdrawn_is_offered_the_usual_way() -> None:
    """The ack never came to the worker (it drops the offer after a while, its heartbeat
    says it holds nothing), or the slot went when the worker left: once observed, the job
    is ready and dispatched like any other, with the sequence it was stored at."""
    w = World(Fleet(lease_s=1000.0, dispatch_timeout_s=30.0))
    w.join("w1", ["echo"], early_offers=True)
    event = new_job("j1")
    assert w.fleet.reserve_early(state(event), 0.0) == "w1"
    w.beat(31.0)
    w.fleet.due(31.0)  # past the dispatch timeout: withdrawn
    assert w.fleet.sched.assigned_to("j1") is None
    stored = w.store(event)
    [offer] = w.fleet.dispatch(32.0)
    assert (offer.job.job_id, offer.worker_id, offer.seq) == ("j1", "w1", stored.seq)


def test_the_slot_of_an_early_offer_to_a_worker_that_left_is_not_kept() -> None:
    w = World()
    w.join("w1", ["echo"], early_offers=True)
    w.join("w2", ["echo"], early_offers=True)
    event = new_job("j1")
    first = w.fleet.reserve_early(state(event), 0.0)
    assert first is not None
    w.store(Event("worker", first, "left", 0.5, {"reason": "drained"}))
    stored = w.store(event)
    [offer] = w.fleet.dispatch(1.0)
    assert offer.worker_id != first and offer.seq == stored.seq


def test_only_a_new_queued_job_is_offered_early() -> None:
    w = World()
    w.join("w1", ["echo"], concurrency=4, early_offers=True)
    w.queue("known", 0.0)
    known = replace(new_job("known"), at=2.0)
    assert w.fleet.reserve_early(state(known), 2.0) is None  # its append will conflict
    plain = Event("job", "v1", "submitted", 1.0, {"queue": "default", "handler": "echo",
                                                  "args": {}, "priority": 0,
                                                  "max_attempts": 3})
    assert state(plain).state == "submitted"
    assert w.fleet.reserve_early(state(plain), 1.0) is None


def test_a_worker_that_did_not_say_it_takes_early_offers_gets_them_the_usual_way() -> None:
    """An older worker (its ``joined`` has no ``early_offers``) would drop an offer
    without a seq: it is offered jobs once they are stored, as before; the flag survives
    a snapshot."""
    w = World()
    w.join("old", ["echo"], concurrency=4)
    assert w.fleet.reserve_early(state(new_job("j1")), 1.0) is None
    w.join("new", ["echo"], concurrency=4, early_offers=True)
    assert w.fleet.reserve_early(state(new_job("j1")), 1.0) == "new"
    doc = take(w.fleet, tip="t", stream_created="c")
    again = restore(doc, policy=RetryPolicy(), queue_policies={}, lease_s=15.0)
    assert again.workers["new"].early_offers and not again.workers["old"].early_offers
    assert again.reserve_early(state(new_job("j2")), 1.0) == "new"
