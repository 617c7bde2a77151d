"""Fault injection with a ledger: kill -9 workers, the sentinel and nats-server itself;
freeze a worker past its lease; resubmit after the dedup window. Every test asserts that
no acknowledged job is lost, none appears unasked, and none succeeds twice.
Run alone with ``pytest -m fault -s`` (the ledger lines print the counts)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from pathlib import Path

import pytest

from jetflow import Client, SubmitTimeout
from jetflow.adapters.bus import connect, ensure_streams
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core.submission import derive_job_id
from jetflow.up import Service, Stack
from tests.conftest import StackFactory, read_log, url_of, wait_until
from tests.ledger import Ledger
from tests.test_projections_e2e import caught_up, query, rebuilt_equal

pytestmark = pytest.mark.fault
FAST = ["--retry", "0.2,2,1"]


def worker_id_of(service: Service, worker_ids: set[str]) -> str | None:
    return next((w for w in worker_ids if f"-{service.pid}-" in w), None)


async def running_workers(client: Client) -> set[str]:
    events = await read_log(url_of(client), ["jf.job.*.started"])
    return {e.data["worker"] for e in events}


async def test_kill9_busy_workers_20_times(make_stack: StackFactory, client: Client) -> None:
    ledger = Ledger(seed=random.randrange(1 << 30))
    rng = random.Random(ledger.seed)
    stack = await make_stack(workers=3, concurrency=2, lease_s=1.5, sentinel_args=FAST)
    await client.watch()

    async def submit(n: int) -> None:  # a wave of work, so there is a busy worker to kill
        for _ in range(n):
            job_id = f"wk-{len(ledger.attempted)}"
            ledger.attempted.add(job_id)
            await client.submit("sleep", {"seconds": rng.choice([0.05, 0.1, 0.2])},
                                job_id=job_id, max_attempts=10)
            ledger.acked.add(job_id)

    await submit(300)
    killed: set[str] = set()
    while ledger.kills < 20:
        if len(ledger.acked - client.terminal.keys()) < 30:
            await submit(60)  # all but done: without more work no worker would be busy
        await asyncio.sleep(rng.uniform(0.1, 0.4))
        live = [s for s in stack.workers if s.running]
        victim = rng.choice(live)
        victim_id = worker_id_of(victim, await running_workers(client))
        if victim_id is None:
            continue  # not busy yet
        await victim.kill()
        killed.add(victim_id)
        ledger.kills += 1
        await stack.add_worker()
    finals = await client.wait_terminal(ledger.acked, timeout=180)
    assert {e.type for e in finals.values()} == {"succeeded"}, ledger.seed
    events = await read_log(url_of(client))
    ledger.check(events, "worker kill -9")
    started = [e for e in events if e.type == "started"]
    retried = {e.id for e in started if e.data["attempt"] > 1}
    on_killed = {e.id for e in started if e.data["worker"] in killed}
    assert retried <= on_killed, f"retried without a kill: {sorted(retried - on_killed)[:5]}"


async def test_kill9_nats_server_during_2000_submissions(
        server: EmbeddedServer, make_stack: StackFactory, client: Client,
        tmp_path: Path) -> None:
    ledger = Ledger(seed=random.randrange(1 << 30))
    rng = random.Random(ledger.seed)
    stack = await make_stack(workers=2, concurrency=8, lease_s=5.0, projector=True)
    window = asyncio.Semaphore(40)

    async def submit(i: int) -> None:
        msg_id = f"srv-{ledger.seed}-{i}"
        ledger.attempted.add(derive_job_id(msg_id, "", 0))
        async with window:
            # not acknowledged in time: it may or may not exist, either is fine
            with contextlib.suppress(SubmitTimeout):
                ledger.acked.add(await client.submit("echo", {"i": i}, msg_id=msg_id,
                                                     reply_timeout_s=60))

    async def crash_server() -> None:
        while len(ledger.acked) < rng.randint(300, 900):
            await asyncio.sleep(0.02)
        await server.kill()
        ledger.kills += 1
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        await server.start()

    await asyncio.gather(crash_server(), *(submit(i) for i in range(2000)))
    assert ledger.kills == 1 and len(ledger.acked) >= 1900, len(ledger.acked)

    async def all_done() -> bool:
        done = await read_log(url_of(client), ["jf.job.*.succeeded"])
        return ledger.acked <= {e.id for e in done}
    await wait_until(all_done, 120, "every acknowledged job to succeed")
    ledger.check(await read_log(url_of(client)), "nats-server kill -9")
    # the projector read on through the restart: it reaches the head, and its file is
    # what a clean rebuild of the log gives (nothing applied twice, nothing skipped)
    live = stack.data_dir / "projections.sqlite"
    await caught_up(live, server.url, timeout_s=60)
    await rebuilt_equal(server.url, live, tmp_path / "rebuilt.sqlite")
    succeeded = query(live, "SELECT jobs FROM queue_states WHERE state = 'succeeded'")
    assert succeeded and succeeded[0][0] >= len(ledger.acked)


async def test_kill9_sentinel_repeatedly(make_stack: StackFactory, client: Client) -> None:
    ledger = Ledger(seed=random.randrange(1 << 30))
    rng = random.Random(ledger.seed)
    stack = await make_stack(workers=2, concurrency=4)
    await client.watch()

    async def submit_all() -> None:
        for i in range(400):
            job_id = f"sk-{i}"
            ledger.attempted.add(job_id)
            await client.submit("sleep", {"seconds": rng.choice([0, 0.01, 0.05])},
                                job_id=job_id, reply_timeout_s=60)
            ledger.acked.add(job_id)

    submitter = asyncio.create_task(submit_all())
    while ledger.kills < 8:
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        await stack.sentinels[-1].kill()
        ledger.kills += 1
        await stack.add_sentinel()
    await submitter
    finals = await client.wait_terminal(ledger.acked, timeout=120)
    assert {e.type for e in finals.values()} == {"succeeded"}
    ledger.check(await read_log(url_of(client)), "sentinel kill -9")


async def test_zombie_worker_cannot_complete_a_lost_lease(make_stack: StackFactory,
                                                          client: Client) -> None:
    ledger = Ledger(seed=0)
    stack = await make_stack(workers=1, concurrency=1, lease_s=1.5, sentinel_args=FAST)
    zombie = stack.workers[0]
    ledger.attempted.add("zombie-job")
    await client.submit("sleep", {"seconds": 2.5}, job_id="zombie-job")
    ledger.acked.add("zombie-job")

    async def is_running() -> bool:
        return (await client.status("zombie-job")).state == "running"
    await wait_until(is_running, 20, "the job to run")
    zombie.signal(signal.SIGSTOP)  # frozen mid-job: no heartbeats, its child sleeps on
    await stack.add_worker()
    job = await client.wait("zombie-job", timeout=30)
    assert job.state == "succeeded" and job.attempt == 2
    zombie.signal(signal.SIGCONT)
    await asyncio.sleep(4.0)  # the zombie wakes up, its child is done, it tries to record
    history = await client.history("zombie-job")
    assert [e.type for e in history].count("succeeded") == 1
    first = next(e for e in history if e.type == "timed_out")
    assert "lost" in first.data["reason"]
    log_text = zombie.log_path.read_text()
    assert "lost the lease" in log_text, log_text[-2000:]
    ledger.check(await read_log(url_of(client)), "zombie worker")


async def test_duplicate_after_the_dedup_window_is_one_job(
        server: EmbeddedServer, tmp_path: Path) -> None:
    nc = await connect(server.url)
    await ensure_streams(nc.jetstream(), dedup_window_s=1.0)
    await nc.close()
    async with Stack(data_dir=tmp_path / "dedup", nats_url=server.url, workers=1,
                     projector=False):
        from jetflow import connect as client_connect

        client = await client_connect(server.url)
        first = await client.submit("echo", {"n": 1}, msg_id="order-7")
        await client.wait(first, timeout=20)
        await asyncio.sleep(1.5)  # JF_SUBMIT forgot the msg id by now
        t0 = time.monotonic()
        second = await client.submit("echo", {"n": 2}, msg_id="order-7")
        assert second == first and time.monotonic() - t0 < 5
        by_id = await client.submit("echo", {"n": 3}, job_id=first)
        assert by_id == first
        history = await client.history(first)
        assert [e.type for e in history].count("submitted") == 1
        assert [e.type for e in history].count("succeeded") == 1
        await client.close()
