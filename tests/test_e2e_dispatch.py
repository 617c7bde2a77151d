"""Dispatch: strict priority, capability matching, exactly-once under load and races."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import nats.js.errors
import pytest

from jetflow import Client, SubmissionsRejected
from jetflow.adapters.bus import (
    Conflict,
    EventLog,
    Publisher,
    connect,
    ensure_streams,
    events_retention,
    stream_configs,
)
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S
from jetflow.core.events import Event, job_event
from tests.conftest import StackFactory, read_log, url_of, wait_until


def assert_exactly_once(events: list[Event], job_ids: list[str]) -> None:
    """From the log: one `succeeded` per job, one accepted `started` per attempt."""
    succeeded = Counter(e.id for e in events if e.type == "succeeded")
    started = Counter((e.id, e.data["attempt"]) for e in events if e.type == "started")
    assert set(succeeded) == set(job_ids), "missing or unexpected jobs"
    assert max(succeeded.values()) == 1, succeeded.most_common(3)
    assert max(started.values()) == 1, started.most_common(3)


async def test_strict_priority_fifo_within_priority(make_stack: StackFactory,
                                                    client: Client) -> None:
    await make_stack(workers=1, concurrency=1, worker_args=["--prefetch", "0"])
    blocker = await client.submit("sleep", {"seconds": 1.5})
    await wait_until(lambda: _state_is(client, blocker, "running"), 20, "blocker running")
    plan = [(p, n) for n in range(3) for p in (1, 7, 3, 9, 0)]  # interleaved priorities
    ids = {}
    for priority, n in plan:
        ids[await client.submit("echo", {"p": priority, "n": n}, priority=priority)] = \
            (priority, n)
    for job_id in ids:
        assert (await client.wait(job_id, timeout=60)).state == "succeeded"
    started = [e for e in await read_log(url_of(client), ["jf.job.*.started"]) if e.id in ids]
    order = [ids[e.id] for e in sorted(started, key=lambda e: e.seq)]
    assert order == sorted(plan, key=lambda pn: (-pn[0], pn[1])), order


async def test_capability_matching(make_stack: StackFactory, client: Client) -> None:
    stack = await make_stack(workers=0)
    echo_worker = await stack.add_worker("echo")
    sleep_worker = await stack.add_worker("sleep")
    await stack.wait_for_workers(2, 0, 30)
    jobs = [await client.submit("echo", {"i": i}) for i in range(10)]
    jobs += [await client.submit("sleep", {"seconds": 0.01}) for _ in range(10)]
    finals = [await client.wait(j, timeout=60) for j in jobs]
    workers = {f.handler: set() for f in finals}
    for f in finals:
        assert f.state == "succeeded"
        workers[f.handler].add(f.worker)
    assert len(workers["echo"]) == 1 and len(workers["sleep"]) == 1
    assert workers["echo"] != workers["sleep"]
    assert echo_worker.running and sleep_worker.running


async def test_known_handler_without_live_worker_waits(make_stack: StackFactory,
                                                       client: Client) -> None:
    stack = await make_stack(workers=1, handlers="fail")
    await stack.workers[0].stop()  # it announced `fail`, then left
    await wait_until(lambda: _has_event(client, "jf.worker.*.left"), 20, "worker left")
    job_id = await client.submit("fail", {"permanent": True})
    await asyncio.sleep(2.0)
    assert (await client.status(job_id)).state == "queued"  # known, visible, waiting
    await stack.add_worker("fail")
    assert (await client.wait(job_id, timeout=30)).state == "dead_lettered"


async def test_500_concurrent_submissions_succeed_exactly_once(make_stack: StackFactory,
                                                               client: Client) -> None:
    await make_stack(workers=2, concurrency=4)
    await client.watch()
    ids = await asyncio.gather(*(client.submit("echo", {"i": i}) for i in range(500)))
    assert len(set(ids)) == 500
    finals = await client.wait_terminal(set(ids), timeout=120)
    assert {e.type for e in finals.values()} == {"succeeded"}
    assert_exactly_once(await read_log(url_of(client)), ids)


async def test_racing_claims_exactly_one_wins(server: EmbeddedServer) -> None:
    """Two connections claim the same attempt at once, 200 times: one wins each time."""
    ncs = [await connect(server.url) for _ in range(3)]
    from jetflow.adapters.bus import ensure_streams

    await ensure_streams(ncs[0].jetstream())
    logs = [EventLog(Publisher(nc)) for nc in ncs]
    rounds = 200
    for i in range(rounds):
        job = f"race-{i}"
        now = time.time()
        s1 = await logs[0].append(job_event(job, "submitted", now, queue="q", handler="echo",
                                            args={}, priority=0, max_attempts=1),
                                  expected_seq=0)
        s2 = await logs[0].append(job_event(job, "queued", now, attempt=1),
                                  expected_seq=s1.seq)
        claims = [log.append(job_event(job, "started", now, attempt=1, worker=f"w{k}",
                                       lease_s=15.0), expected_seq=s2.seq,
                             msg_id=f"{job}:started:1:w{k}")
                  for k, log in enumerate(logs[1:])]
        results = await asyncio.gather(*claims, return_exceptions=True)
        wins = [r for r in results if not isinstance(r, BaseException)]
        assert len(wins) == 1 and isinstance(next(r for r in results if r not in wins),
                                             Conflict), results
    started = await read_log(server.url, ["jf.job.*.started"])
    per_job = Counter(e.id for e in started)
    assert len(per_job) == rounds and set(per_job.values()) == {1}
    for nc in ncs:
        await nc.close()


async def test_two_sentinels_race_without_duplicates(make_stack: StackFactory,
                                                     client: Client) -> None:
    stack = await make_stack(workers=2, concurrency=4)
    await stack.add_sentinel()
    await client.watch()
    ids = await asyncio.gather(*(client.submit("echo", {"i": i}) for i in range(200)))
    finals = await client.wait_terminal(set(ids), timeout=120)
    assert {e.type for e in finals.values()} == {"succeeded"}
    events = await read_log(url_of(client))
    assert_exactly_once(events, ids)
    # both sentinels took submissions and decided; the log kept one decision of each
    decided = Counter((e.id, e.type) for e in events if e.type in ("submitted", "queued"))
    assert len(decided) == len(ids) and max(decided.values()) == 1


async def _state_is(client: Client, job_id: str, state: str) -> bool:
    return (await client.status(job_id)).state == state


async def _has_event(client: Client, subject: str) -> bool:
    return bool(await read_log(url_of(client), [subject]))




async def test_submit_many_returns_the_ids_in_order_and_is_idempotent(
        make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1)
    jobs = [{"handler": "echo", "args": {"i": i}, "job_id": f"many-{i}"} for i in range(300)]
    ids = await client.submit_many(jobs, window=64)
    assert ids == [f"many-{i}" for i in range(300)]
    assert await client.submit_many(jobs) == ids  # the same again: the same jobs
    derived = await client.submit_many([("echo", {"k": k}) for k in range(200)])
    assert len(set(derived)) == 200
    for k in (0, 137, 199):
        submitted = next(e for e in await client.history(derived[k]) if e.type == "submitted")
        assert submitted.data["args"] == {"k": k}  # in order
    with pytest.raises(SubmissionsRejected) as info:
        await client.submit_many([("echo", {"a": 1}), ("nope", {}), ("echo", {"a": 2})])
    assert list(info.value.rejected) == [1]
    assert info.value.rejected[1].code == "unknown_handler"
    assert info.value.job_ids[0] and info.value.job_ids[2] and info.value.job_ids[1] is None
    with pytest.raises(TypeError, match="'handler'"):
        await client.submit_many([{"args": {}}])


async def test_a_jf_work_stream_of_an_older_jetflow_is_retired(client: Client) -> None:
    await client.js.add_stream(name=S.RETIRED_WORK_STREAM, subjects=S.WORK_SUBJECTS)
    await ensure_streams(client.js)
    with pytest.raises(nats.js.errors.NotFoundError):
        await client.js.stream_info(S.RETIRED_WORK_STREAM)


async def test_the_log_has_a_size_limit_even_one_an_older_jetflow_made(
        server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    nc = await connect(server.url)
    js = nc.jetstream()
    unbounded = next(c for c in stream_configs() if c.name == S.EVENTS_STREAM)
    unbounded.max_bytes = -1
    await js.add_stream(unbounded)
    await ensure_streams(js)
    assert (await js.stream_info(S.EVENTS_STREAM)).config.max_bytes == 4 * 1024**3
    monkeypatch.setenv("JETFLOW_EVENTS_MAX_BYTES", "12345678")
    monkeypatch.setenv("JETFLOW_EVENTS_MAX_AGE_DAYS", "7")
    assert events_retention() == (12345678, 7 * 86400.0)
    await nc.close()
