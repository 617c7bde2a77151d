"""Failure handling, end to end: cancellation, timeouts, crash isolation, re-drive,
lost workers and graceful drain. Real processes, real nats-server."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from jetflow import Client, JobError
from jetflow.adapters.bus import EventLog, Publisher
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core.codec import encode_event
from jetflow.core.events import Event, job_event
from jetflow.sentinel.service import Sentinel
from jetflow.workers.attempt import Attempt, Deps
from jetflow.workers.pool import Outcome
from jetflow.workers.worker import Worker
from tests.conftest import StackFactory, wait_until

FAST_RETRY = ["--retry", "0.3,2,2"]
CRASHY = ("echo,sleep,fail,crash=examples.handlers:segfault,bye=examples.handlers:hard_exit,"
          "hog=examples.handlers:hog,once=examples.handlers:fail_once,"
          "long=examples.handlers:long_lines")


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


async def running(client: Client, job_id: str) -> None:
    async def check() -> bool:
        return (await client.status(job_id)).state == "running"
    await wait_until(check, 20, f"{job_id} running")


async def test_cancel_queued_running_and_finished(make_stack: StackFactory,
                                                  client: Client) -> None:
    await make_stack(workers=1, concurrency=1, worker_args=["--prefetch", "0"])
    long = await client.submit("sleep", {"seconds": 30})
    await running(client, long)
    queued = await client.submit("echo", {})
    assert (await client.cancel(queued, "changed my mind"))["state"] == "cancel_requested"
    assert (await client.wait(queued, timeout=10)).state == "cancelled"
    assert "started" not in types(await client.history(queued))

    answer = await client.cancel(long)
    assert answer["running"] is True
    # within 10 s of a 30 s sleep: the child was stopped, not waited for (no timed assert)
    assert (await client.wait(long, timeout=10)).state == "cancelled"
    # the worker says it stopped the run (a worker may not decide ``cancelled``); the
    # sentinel then records the job cancelled
    history = await client.history(long)
    assert types(history)[-3:] == ["cancel_requested", "failed", "cancelled"]
    assert history[-2].data["error_type"] == "Cancelled"

    noop = await client.cancel(long)
    assert noop["noop"] and "already cancelled" in noop["message"]
    with pytest.raises(JobError, match="no job"):
        await client.cancel("never-submitted")
    # the worker is free again
    again = await client.submit("echo", {"after": "cancel"})
    assert (await client.wait(again, timeout=20)).state == "succeeded"


async def test_run_timeout_backoff_then_dead_letter(make_stack: StackFactory,
                                                   client: Client) -> None:
    await make_stack(workers=1, sentinel_args=FAST_RETRY)
    job_id = await client.submit("sleep", {"seconds": 10}, timeout_s=0.5, max_attempts=3)
    job = await client.wait(job_id, timeout=40)
    assert job.state == "dead_lettered" and job.attempt == 3
    events = await client.history(job_id)
    assert types(events).count("timed_out") == 3
    for scheduled, requeued in zip([e for e in events if e.type == "retry_scheduled"],
                                   [e for e in events if e.type == "queued"], strict=True):
        assert requeued.at >= scheduled.data["not_before"] - 0.05  # backoff respected
        assert requeued.at - scheduled.at >= scheduled.data["delay_s"] - 0.05
    delays = [e.data["delay_s"] for e in events if e.type == "retry_scheduled"]
    assert delays[1] > delays[0]  # exponential (jitter 20% cannot invert a factor of 2)


async def test_queue_wait_and_total_deadline(make_stack: StackFactory,
                                             client: Client) -> None:
    await make_stack(workers=1, concurrency=1, worker_args=["--prefetch", "0"])
    blocker = await client.submit("sleep", {"seconds": 4})
    await running(client, blocker)
    waits = await client.submit("echo", {}, queue_timeout_s=0.5)
    job = await client.wait(waits, timeout=15)
    assert job.state == "dead_lettered"
    history = await client.history(waits)
    assert "started" not in types(history)
    assert next(e for e in history if e.type == "timed_out").data["kind"] == "queue"

    late = await client.submit("sleep", {"seconds": 30}, deadline_s=6.0)
    job = await client.wait(late, timeout=30)
    assert job.state == "dead_lettered"
    timed_out = [e for e in await client.history(late) if e.type == "timed_out"]
    assert timed_out and timed_out[-1].data["kind"] == "deadline"


@pytest.mark.parametrize(("handler", "args", "exit_code"), [
    ("crash", {}, -signal.SIGSEGV),
    ("bye", {"code": 7}, 7),
])
async def test_crashing_child_fails_only_its_attempt(make_stack: StackFactory, client: Client,
                                                     handler: str, args: dict,
                                                     exit_code: int) -> None:
    await make_stack(workers=1, concurrency=2, handlers=CRASHY)
    neighbour = await client.submit("sleep", {"seconds": 1.0})
    await running(client, neighbour)
    bad = await client.submit(handler, args, max_attempts=1)
    job = await client.wait(bad, timeout=20)
    assert job.state == "dead_lettered"
    failed = next(e for e in await client.history(bad) if e.type == "failed")
    assert failed.data["exit_code"] == exit_code and failed.data["error_type"] == "ChildCrashed"
    assert (await client.wait(neighbour, timeout=20)).state == "succeeded"
    after = await client.submit("echo", {"still": "serving"})
    assert (await client.wait(after, timeout=20)).state == "succeeded"


async def test_memory_limit_fails_the_attempt(make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1, handlers=CRASHY, worker_args=["--memory-limit", "300"])
    job_id = await client.submit("hog", {"mb": 1024}, max_attempts=1)
    job = await client.wait(job_id, timeout=20)
    assert job.state == "dead_lettered" and job.error["error_type"] == "MemoryError"


async def test_retry_command_redrives_a_dead_letter(make_stack: StackFactory, client: Client,
                                                    tmp_path: Path) -> None:
    await make_stack(workers=1, handlers=CRASHY)
    job_id = await client.submit("once", {"marker": str(tmp_path / "marker")})
    assert (await client.wait(job_id, timeout=20)).state == "dead_lettered"
    answer = await client.retry(job_id, attempts=2)
    assert answer["attempt"] == 2
    job = await client.wait(job_id, timeout=20)
    assert (job.state, job.result) == ("succeeded", {"attempt": 2})
    assert types(await client.history(job_id)).count("started") == 2
    with pytest.raises(JobError, match="only dead-lettered"):
        await client.retry(job_id)


async def test_a_retry_right_after_the_dead_letter_waits_for_the_sentinel_to_see_it(
        server: EmbeddedServer, client: Client) -> None:
    """A client can see the sentinel's `dead_lettered` in the stream before the sentinel
    has its ack (or reads it back); a retry sent that moment must not be refused as 'job
    is failed'. Here the sentinel learns of that event 2.5 s late, both ways: longer than
    a client's request used to wait before sending it again (the repeat was then refused
    while the first went through)."""
    loop = asyncio.get_running_loop()
    async with Sentinel(server.url, lease_s=3.0) as sentinel, \
            Worker(server.url, handlers="fail", lease_s=3.0):
        observe_batch, after_append = sentinel._observe_batch, sentinel._after_append

        def late_batch(msgs: list[Any]) -> None:
            if any(m.subject.endswith(".dead_lettered") for m in msgs):
                loop.call_later(2.5, observe_batch, msgs)
            else:
                observe_batch(msgs)

        def late_ack(append: Any, *rest: Any) -> None:
            if append.event.type == "dead_lettered":
                loop.call_later(2.5, after_append, append, *rest)
            else:
                after_append(append, *rest)
        sentinel._observe_batch = late_batch  # type: ignore[method-assign]
        sentinel._after_append = late_ack  # type: ignore[method-assign]
        job_id = await client.submit("fail", {"permanent": True})
        assert (await client.wait(job_id, timeout=20)).state == "dead_lettered"
        assert sentinel.fleet.jobs[job_id].state == "failed"  # it has not learnt of it yet
        answer = await client.retry(job_id, attempts=1)
        assert answer["state"] == "queued" and answer["attempt"] == 2
        assert (await client.wait(job_id, timeout=20)).state == "dead_lettered"
        assert types(await client.history(job_id)).count("started") == 2


async def test_an_outcome_whose_earlier_try_was_recorded_is_not_called_dropped(
        server: EmbeddedServer, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """The first append of `succeeded` went through but its ack was lost, and the server
    (restarted) forgot its msg id: the next try conflicts with the worker's own event.
    That is a recorded outcome, not 'this worker lost the lease'."""
    log = EventLog(Publisher(client.nc))
    now = time.time()
    seq = 0
    for type_, data in (("submitted", {"queue": "q", "handler": "echo", "args": {},
                                       "priority": 0, "max_attempts": 1}),
                        ("queued", {"attempt": 1}),
                        ("started", {"attempt": 1, "worker": "w1", "lease_s": 15.0})):
        seq = (await log.append(job_event("j1", type_, now, **data), expected_seq=seq)).seq
    deps = Deps(client.nc, log, None, "w1", 15.0, {})  # type: ignore[arg-type]  # no pool
    attempt = Attempt(deps, {"job_id": "j1", "attempt": 1, "handler": "echo"}, {},
                      started_seq=seq)
    earlier = job_event("j1", "succeeded", now, attempt=1, worker="w1", result=7,
                        duration_ms=1.0)
    await log.append(earlier, expected_seq=seq, msg_id="the-first-try")
    caplog.set_level(logging.DEBUG, logger="jetflow.worker")
    await attempt.record(Outcome("succeeded", result=7, duration_ms=1.0))
    said = [r.getMessage() for r in caplog.records if r.name == "jetflow.worker"]
    assert not [m for m in said if "dropped" in m] and any("earlier try" in m for m in said)
    assert types(await client.history("j1")).count("succeeded") == 1


async def test_killed_worker_is_lost_and_its_job_runs_elsewhere(make_stack: StackFactory,
                                                                client: Client) -> None:
    stack = await make_stack(workers=2, concurrency=1, lease_s=2.0, sentinel_args=FAST_RETRY)
    job_id = await client.submit("sleep", {"seconds": 1.5})
    await running(client, job_id)
    victim_id = (await client.status(job_id)).worker
    by_pid = {s.pid: s for s in stack.workers}
    victim = next(s for pid, s in by_pid.items() if victim_id and f"-{pid}-" in victim_id)
    await victim.kill()
    job = await client.wait(job_id, timeout=30)
    assert job.state == "succeeded" and job.attempt == 2 and job.worker != victim_id
    events = await client.history(job_id)
    lost = next(e for e in events if e.type == "timed_out")
    assert "lost" in lost.data["reason"]


async def test_jobs_after_a_worker_kill9_start_on_a_live_worker_at_once(
        make_stack: StackFactory, client: Client) -> None:
    """A worker killed with -9 looks like the emptiest one. Four seconds later (its
    lease, 15 s, far from over) the jobs submitted start on the live worker within 2 s:
    the dead one got no offer after its second missed heartbeat, and what it had been
    offered went to the live one at once."""
    stack = await make_stack(workers=2, concurrency=2, lease_s=15.0)
    await stack.workers[0].kill()
    await asyncio.sleep(4.0)
    submitted = {}
    for i in range(4):
        job_id = await client.submit("echo", {"i": i})
        submitted[job_id] = time.time()
    for job_id, at in submitted.items():
        job = await client.wait(job_id, timeout=30)
        started = next(e for e in await client.history(job_id) if e.type == "started")
        assert job.state == "succeeded" and job.attempt == 1
        assert f"-{stack.workers[0].pid}-" not in started.data["worker"]
        assert started.at - at < 2.0, f"{job_id} started {started.at - at:.2f}s after submit"


async def test_sigterm_drains_and_hands_back(make_stack: StackFactory, client: Client) -> None:
    stack = await make_stack(workers=1, concurrency=1, worker_args=["--grace", "0.5"])
    job_id = await client.submit("sleep", {"seconds": 3}, max_attempts=1)
    await running(client, job_id)
    await stack.workers[0].stop()  # SIGTERM: grace 0.5 s, then hand back
    await wait_until(lambda: _state(client, job_id, "queued"), 15, "handed back")
    await stack.add_worker()
    job = await client.wait(job_id, timeout=30)
    assert job.state == "succeeded"  # max_attempts=1, yet the hand-back did not use it up
    handback = [e for e in await client.history(job_id) if e.type == "handed_back"]
    assert len(handback) == 1


async def _state(client: Client, job_id: str, state: str) -> bool:
    return (await client.status(job_id)).state == state



async def test_messages_published_by_hand_on_a_job_do_not_stick_it(
        make_stack: StackFactory, client: Client) -> None:
    """A valid event the state machine refuses, or a body that is no event, on a job's
    subject is still the latest message there: the next append for the job must expect
    it (optimistic concurrency), or the job would conflict for ever."""
    await make_stack(workers=1, concurrency=1, worker_args=["--prefetch", "0"],
                     sentinel_args=FAST_RETRY)
    dead = await client.submit("fail", {"message": "no", "permanent": True})
    assert (await client.wait(dead, timeout=20)).state == "dead_lettered"
    await client.js.publish(f"jf.job.{dead}.started", encode_event(
        Event("job", dead, "started", time.time(), {"attempt": 1, "worker": "w",
                                                    "lease_s": 1.0})))
    await client.js.publish(f"jf.job.{dead}.progress", b"{not an event")
    await client.js.publish("jf.job.ghost.succeeded", encode_event(  # never submitted
        Event("job", "ghost", "succeeded", time.time(), {"attempt": 1, "worker": "w",
                                                         "result": None})))
    with pytest.raises(JobError, match="no job 'ghost' in the log"):
        await client.cancel("ghost")
    answer = await client.retry(dead, attempts=1)
    assert answer["state"] == "queued", answer
    assert (await client.wait(dead, timeout=20)).state == "dead_lettered"  # failed again

    blocker = await client.submit("sleep", {"seconds": 1.0})
    await running(client, blocker)
    waiting = await client.submit("echo", {"n": 1})  # queued behind the blocker
    stray = {blocker: Event("job", blocker, "started", time.time(),  # it is running
                            {"attempt": 1, "worker": "w", "lease_s": 1.0}),
             waiting: Event("job", waiting, "succeeded", time.time(),  # it is queued
                            {"attempt": 1, "worker": "w", "result": None})}
    for job_id, event in stray.items():
        await client.js.publish(f"jf.job.{job_id}.progress", b"{not an event")
        await client.js.publish(f"jf.job.{job_id}.{event.type}", encode_event(event))
    for job_id in (blocker, waiting):
        job = await client.wait(job_id, timeout=30)
        assert (job.state, job.attempt) == ("succeeded", 1)  # nothing cost an attempt
        assert "timed_out" not in types(await client.history(job_id))


async def test_a_line_longer_than_any_limit_is_cut_and_the_job_goes_on(
        make_stack: StackFactory, client: Client) -> None:
    """A 100 KiB stdout line is cut to 16 KiB saying so; a 17 MiB stderr line (over the
    child pipe reader's limit) is dropped saying so; the job still succeeds."""
    import json

    from tests.conftest import url_of
    from tests.test_projections_e2e import cli

    await make_stack(workers=1, handlers=CRASHY)
    job_id = await client.submit("long", {"stdout": 100_000, "stderr": 17 << 20})
    job = await client.wait(job_id, timeout=60)
    assert job.state == "succeeded" and job.result == "done"
    code, out, err = await cli(url_of(client), "logs", job_id, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    texts = [str(entry.get("line", entry)) for entry in lines]
    assert any("[jetflow: line cut, 100,000 bytes]" in t for t in texts), texts[:3]
    assert any("over the 16 MiB limit was dropped" in t for t in texts), [t[:80] for t in texts]
