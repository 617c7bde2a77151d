"""The origin check on a stack whose services each run with their own credentials: worker
A, with valid worker credentials, appends outcomes and a claim for jobs worker B holds (or
that nobody holds); the server stores them (a worker may append a worker's events), and
neither the sentinel nor the projector applies any of them, each recording why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from jetflow.adapters.auth import Credentials
from jetflow.adapters.bus import EventLog, Publisher, connect, last_job_event
from jetflow.adapters.client import Client
from jetflow.core.events import Event
from jetflow.core.origin import Signer
from jetflow.up import Stack
from tests.test_projections_e2e import caught_up, query

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    data = tmp_path_factory.mktemp("origin-stack")
    st = Stack(data_dir=data, port=0, workers=2, concurrency=1, auth=True)
    await st.start(ready_timeout_s=30)
    try:
        yield st
    finally:
        await st.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def admin(stack: Stack) -> AsyncIterator[Client]:
    client = Client(await stack.connect())
    try:
        yield client
    finally:
        await client.close()


async def as_worker(stack: Stack, worker_id: str) -> tuple[EventLog, Client]:
    """An event log appending with ``worker_id``'s own credentials and signing key."""
    creds = Credentials(context=str(stack.data_dir / "contexts" / f"worker-{worker_id}.json")
                        ).with_context()
    nc = await connect(stack.url, credentials=creds)
    key = creds.key_bytes()
    assert key is not None
    return EventLog(Publisher(nc), signer=Signer(key, public=True)), Client(nc)


async def running_on(client: Client, job_id: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = await client.status(job_id)
        if job.state == "running" and job.worker:
            return job.worker
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} never ran")


async def head(client: Client, job_id: str) -> int:
    found = await last_job_event(client.nc, job_id)
    assert found is not None
    return found[0]


def sentinel_log(stack: Stack) -> str:
    return (stack.data_dir / "logs" / "sentinel-1.log").read_text()


async def test_another_worker_s_outcomes_for_a_held_job_are_stored_but_never_applied(
        stack: Stack, admin: Client) -> None:
    assert stack.auth is not None
    job_id = await admin.submit("sleep", {"seconds": 1.5})
    holder = await running_on(admin, job_id)
    other = next(w for w in stack.auth.workers.values() if w != holder)
    log, client = await as_worker(stack, other)
    try:
        attempt = (await admin.status(job_id)).attempt
        # signed with A's key, naming B: the signature gives it away
        posing = Event("job", job_id, "succeeded", time.time(),
                       {"attempt": attempt, "worker": holder, "result": {"forged": True}})
        posing_seq = (await log.append(posing, expected_seq=await head(admin, job_id),
                                       msg_id="forged-1")).seq
        # signed by A as A: A does not hold the claim
        own = Event("job", job_id, "succeeded", time.time(),
                    {"attempt": attempt, "worker": other, "result": {"forged": True}})
        own_seq = (await log.append(own, expected_seq=await head(admin, job_id),
                                    msg_id="forged-2")).seq
        # and no signature at all
        bare = Event("job", job_id, "failed", time.time(), {
            "attempt": attempt, "worker": holder, "error_type": "X", "message": "forged",
            "retryable": False})
        bare_seq = (await EventLog(Publisher(client.nc)).append(
            bare, expected_seq=await head(admin, job_id), msg_id="forged-3")).seq
    finally:
        await client.close()
    assert (await admin.status(job_id)).attempt == attempt
    job = await admin.wait(job_id, timeout=30)
    assert job.state == "succeeded" and job.worker == holder
    assert job.result == {"slept": 1.5}, job.result
    stored = [e.seq for e in await admin.history(job_id)]
    assert {posing_seq, own_seq, bare_seq} <= set(stored)  # the log has them all
    db = stack.data_dir / "projections.sqlite"
    await caught_up(db, stack.url)
    errors = dict((seq, (code, reason)) for seq, code, reason in query(
        db, "SELECT seq, code, reason FROM projection_errors WHERE seq IN (?, ?, ?)",
        posing_seq, own_seq, bare_seq))
    assert errors[posing_seq] == ("origin_refused", f"succeeded is not signed by worker "
                                                    f"{holder}")
    assert errors[own_seq][0] == "illegal_transition"
    assert "does not hold the claim" in errors[own_seq][1]
    assert errors[bare_seq] == ("origin_refused", f"failed of worker {holder} is not signed")
    [(state, result)] = query(db, "SELECT state, result FROM jobs WHERE job_id = ?", job_id)
    assert state == "succeeded" and "forged" not in (result or "")
    text = sentinel_log(stack)
    assert f"refused succeeded of job {job_id} at seq {posing_seq}" in text
    assert f"refused failed of job {job_id} at seq {bare_seq}" in text


async def test_a_claim_as_another_worker_is_refused_and_the_job_still_runs(
        stack: Stack, admin: Client) -> None:
    assert stack.auth is not None
    job_id = await admin.submit("echo", {"n": 7}, queue="nobody")  # no worker serves it
    a, b = list(stack.auth.workers.values())[:2]
    log, client = await as_worker(stack, a)
    try:
        claim = Event("job", job_id, "started", time.time(),
                      {"attempt": 1, "worker": b, "lease_s": 15.0})
        claim_seq = (await log.append(claim, expected_seq=await head(admin, job_id),
                                      msg_id="forged-claim")).seq
    finally:
        await client.close()
    await stack.add_worker(None, "--queue", "nobody")
    job = await admin.wait(job_id, timeout=30)
    assert job.state == "succeeded" and job.result == {"n": 7}
    assert job.worker not in (a, b)
    db = stack.data_dir / "projections.sqlite"
    await caught_up(db, stack.url)
    [(code,)] = query(db, "SELECT code FROM projection_errors WHERE seq = ?", claim_seq)
    assert code == "origin_refused"
    assert f"refused started of job {job_id} at seq {claim_seq}" in sentinel_log(stack)


async def test_each_service_context_holds_only_its_own_key(stack: Stack) -> None:
    contexts = Path(stack.data_dir / "contexts")
    for role in ("sentinel", "projector", "admin"):
        creds = Credentials(context=str(contexts / f"{role}.json")).with_context()
        assert creds.secret_bytes() and not creds.key_bytes()
    for path in contexts.glob("worker-*.json"):
        creds = Credentials(context=str(path)).with_context()
        assert creds.key_bytes() and not creds.secret_bytes()
    for role in ("submitter", "operator"):
        creds = Credentials(context=str(contexts / f"{role}.json")).with_context()
        assert not creds.secret_bytes() and not creds.key_bytes()


async def test_a_zombie_with_valid_credentials_cannot_complete_a_lost_lease(
        tmp_path: Path) -> None:
    """Its lease taken over while it was frozen, a worker with its own valid credentials
    and signing key records its late outcome: the job keeps the new holder's result."""
    import signal

    from tests.test_faults import FAST

    async with Stack(data_dir=tmp_path / "zombie", port=0, workers=1, concurrency=1,
                     lease_s=1.5, sentinel_args=FAST, projector=False, auth=True) as st:
        client = Client(await st.connect())
        try:
            zombie = st.workers[0]
            job_id = await client.submit("sleep", {"seconds": 2.5}, job_id="zombie-secured")
            await running_on(client, job_id)
            zombie.signal(signal.SIGSTOP)  # no heartbeats; its child sleeps on
            await st.add_worker()
            job = await client.wait(job_id, timeout=30)
            assert job.state == "succeeded" and job.attempt == 2
            zombie.signal(signal.SIGCONT)
            await asyncio.sleep(4.0)  # it wakes, its child is done, it tries to record
            history = await client.history(job_id)
            assert [e.type for e in history].count("succeeded") == 1
            assert (await client.status(job_id)).attempt == 2
            assert "lost the lease" in zombie.log_path.read_text()
        finally:
            await client.close()
