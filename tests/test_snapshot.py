"""The sentinel's snapshot: a fleet restored from it decides what the folded one does,
and keeps doing so as the log goes on. Pure, no server."""

from __future__ import annotations

import orjson
import pytest

from jetflow import Client
from jetflow.core import subjects as S
from jetflow.core.fleet import Fleet
from jetflow.core.retry import RetryPolicy
from jetflow.core.snapshot import SnapshotError, restore, take, tip_digest
from jetflow.core.snapshot import due as snapshot_due
from tests.conftest import StackFactory
from tests.test_scheduler_fleet import World

POLICY = RetryPolicy(base_s=2.0, factor=2.0, cap_s=60.0, jitter=0.0)


def busy_world() -> World:
    """Jobs in every active state, a dead letter, a cancel request, three workers."""
    w = World(Fleet(policy=POLICY, lease_s=15.0))
    w.join("w1", ["echo"], concurrency=2, heartbeat_s=1.0, prefetch=1)
    w.join("w2", ["echo", "sleep"], queues=["default", "bulk"], concurrency=1)
    w.join("w3", ["echo"])
    w.fleet.heartbeat("w1", 5.0, 5.0, frozenset(), held=frozenset({"x"}))
    w.queue("q0", 1.0)
    w.run("q0", 8.0)
    w.queue("q1", 1.0)
    w.run("q1", 8.0)
    w.fail("q1", 9.0)
    w.commit(w.fleet.decide("q1", 9.5, 0.5))  # retry_scheduled
    w.queue("dl", 2.0, max_attempts=1)
    w.run("dl", 8.0)
    w.fail("dl", 9.0, retryable=False)
    w.commit(w.fleet.decide("dl", 9.5, 0.5))  # dead_lettered
    for i in range(2, 6):  # waiting: nothing is dispatched until the test says
        w.queue(f"q{i}", 1.0 + i, priority=i % 3)
    w.queue("c1", 3.0, queue="bulk", handler="sleep")
    w.store(_cancel("c1", "no longer wanted"))
    return w


def _cancel(job_id: str, reason: str):  # type: ignore[no-untyped-def]
    from jetflow.core.events import Event
    return Event("job", job_id, "cancel_requested", 9.8, {"reason": reason})


def round_trip(fleet: Fleet) -> Fleet:
    doc = orjson.loads(orjson.dumps(take(fleet, tip="t", stream_created="c")))
    return restore(doc, policy=POLICY, queue_policies={}, lease_s=15.0)


def decisions(fleet: Fleet, now: float) -> list[object]:
    out = []
    for job_id in sorted(fleet.jobs):
        append = fleet.decide(job_id, now, 0.5)
        out.append(None if append is None else (append.event.type, append.event.data,
                                                append.expected_seq, append.msg_id))
    return out


def test_a_restored_fleet_knows_what_the_folded_one_knows() -> None:
    w = busy_world()
    again = round_trip(w.fleet)
    assert again.jobs == w.fleet.jobs
    assert again.workers == w.fleet.workers
    assert again.known_handlers == w.fleet.known_handlers
    assert again.last_seq == w.fleet.last_seq
    assert again.cancel_reasons() == {"c1": "no longer wanted"}
    assert again.sched.ready_jobs() == w.fleet.sched.ready_jobs()
    assert {j: again.sched.assigned_to(j) for j in again.jobs} == \
        {j: w.fleet.sched.assigned_to(j) for j in w.fleet.jobs}
    assert decisions(again, 12.0) == decisions(w.fleet, 12.0)


def test_a_restored_fleet_goes_on_as_the_folded_one() -> None:
    """The same later events, fed to both, lead to the same decisions and offers."""
    w = busy_world()
    restored = World(round_trip(w.fleet))
    restored.seq, restored.last = w.seq, dict(w.last)
    for world in (w, restored):
        world.beat(20.0)
        world.succeed("q0", 20.5)
        world.queue("late", 21.0, priority=9)
        world.fleet.due(22.0)
    assert decisions(restored.fleet, 23.0) == decisions(w.fleet, 23.0)
    offers = [[(d.job.job_id, d.worker_id, d.seq) for d in world.fleet.dispatch(23.0)]
              for world in (w, restored)]
    assert offers[0] == offers[1] and offers[0]
    assert offers[0][0][0] == "late"  # the highest priority first, in both


def test_the_tip_names_the_message() -> None:
    assert tip_digest("jf.job.a.started", b"{}") == tip_digest("jf.job.a.started", b"{}")
    assert tip_digest("jf.job.a.started", b"{}") != tip_digest("jf.job.b.started", b"{}")
    assert tip_digest("jf.job.a", b".started{}") != tip_digest("jf.job.a.started", b"{}")


@pytest.mark.parametrize("doc", [{"v": 99}, {"v": 1}, {"v": 1, "last_seq": 3, "jobs": [{}]}])
def test_a_snapshot_that_cannot_be_used_says_so(doc: dict[str, object]) -> None:
    with pytest.raises(SnapshotError):
        restore(doc, policy=POLICY, queue_policies={}, lease_s=15.0)


# -- against a real server ---------------------------------------------------------------

async def test_a_restarted_sentinel_starts_from_its_snapshot(make_stack: StackFactory,
                                                             client: Client) -> None:
    """A sentinel stopped stores what it knows; the next one folds only what came after,
    and the jobs it knew of go on: one waiting in a queue no worker serves, a dead
    letter that can be re-driven."""
    stack = await make_stack(workers=1)
    await client.watch()
    done = await client.submit_many([("echo", {"i": i}) for i in range(50)])
    waiting = await client.submit("echo", {"w": 1}, queue="later")
    dead = await client.submit("fail", {"permanent": True})
    await client.wait_terminal(set(done) | {dead}, timeout=60)
    await stack.sentinels[0].stop()
    assert "snapshot at seq" in stack.sentinels[0].log_path.read_text()
    second = await stack.add_sentinel()
    await stack.wait_for_sentinel()
    log = second.log_path.read_text()
    assert "restored from the snapshot at seq" in log, log
    await stack.add_worker(None, "--queue", "later")
    assert (await client.wait(waiting, timeout=30)).state == "succeeded"
    await client.retry(dead, attempts=1)
    assert (await client.wait(dead, timeout=30)).state == "dead_lettered"
    assert [e.type for e in await client.history(dead)].count("started") == 2


async def test_a_snapshot_of_another_log_is_not_used(make_stack: StackFactory,
                                                     client: Client) -> None:
    stack = await make_stack(workers=1)
    job = await client.submit("echo", {"x": 1})
    await client.wait(job, timeout=30)
    await stack.sentinels[0].stop()
    obs = await client.js.object_store(S.SNAPSHOT_BUCKET)
    doc = orjson.loads((await obs.get(S.SENTINEL_SNAPSHOT)).data or b"")
    await obs.put(S.SENTINEL_SNAPSHOT, orjson.dumps({**doc, "tip": "0" * 64}))
    second = await stack.add_sentinel()
    await stack.wait_for_sentinel()
    assert "not using the stored snapshot (the log's message at seq" in \
        second.log_path.read_text()
    assert (await client.wait(await client.submit("echo", {"y": 2}), timeout=30)).state \
        == "succeeded"


def test_a_snapshot_is_due_by_events_scaled_to_the_backlog_or_after_a_quiet_minute() -> None:
    """Taking a snapshot costs about what it holds: with a backlog it waits for more
    events, so however many jobs wait, snapshots cost a bounded share of the sentinel."""
    assert not snapshot_due(0, 0, 3600.0)  # nothing moved
    assert snapshot_due(20_000, 10, 0.0)
    assert not snapshot_due(19_999, 10, 59.0)
    assert snapshot_due(1, 10, 60.0)  # a quiet minute, a small fleet
    assert not snapshot_due(20_000, 50_000, 0.0)  # 50,000 jobs: every 100,000 events
    assert snapshot_due(100_000, 50_000, 0.0)
    assert not snapshot_due(100, 50_000, 600.0)  # folding 100 events again is cheaper
    assert snapshot_due(2_500, 50_000, 60.0)
