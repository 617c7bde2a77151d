"""Early offers against a real server: an idle worker is offered a new job with its
``submitted`` append, and learns the sequence its claim must expect from that append's
ack, which comes to it and to the sentinel alike (``jf.work.<worker>.ack.<sentinel>.<n>``).
The claim stays exclusive; a duplicate append frees the slot; the worker copes with an
ack that comes before its offer, and with one that never comes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from jetflow import Client
from jetflow.adapters.bus import Ack, EventLog, Publisher, connect, read_ack
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S
from jetflow.core.events import Event
from jetflow.workers import worker as worker_module
from jetflow.workers.worker import Worker
from tests.conftest import StackFactory, read_log, url_of, wait_until


class Wire:
    """What an admin's core subscription sees on ``jf.work.>``: offers and early acks."""

    def __init__(self) -> None:
        self.offers: dict[str, list[dict[str, Any]]] = {}  # job id -> offers
        self.acks: dict[str, bytes] = {}  # ack subject -> the ack

    def on(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        parts = subject.decode().split(".")
        if len(parts) == 3:
            for offer in orjson.loads(data):
                self.offers.setdefault(offer["job_id"], []).append(offer)
        elif parts[3] == "ack":
            self.acks[subject.decode()] = data


async def watch(url: str) -> tuple[Any, Wire]:
    nc = await connect(url)
    wire = Wire()
    await nc.subscribe_raw(f"{S.PREFIX}.work.>", wire.on)
    await nc.flush()
    return nc, wire


async def test_an_idle_worker_gets_the_offer_with_the_append_and_claims_by_its_ack(
        make_stack: StackFactory, client: Client) -> None:
    stack = await make_stack(workers=2, concurrency=2)
    await stack.wait_for_workers(2, 0, 30)
    nc, wire = await watch(url_of(client))
    try:
        ids = []
        for i in range(6):  # one at a time: an idle system
            job_id = await client.submit("echo", {"i": i})
            assert (await client.wait(job_id, timeout=30)).state == "succeeded"
            ids.append(job_id)
        await asyncio.sleep(0.3)  # (the last ack on its way to the watcher)
    finally:
        await nc.close()
    events = await read_log(url_of(client), [f"{S.PREFIX}.job.>"])
    for job_id in ids:
        assert len(wire.offers[job_id]) == 1, wire.offers[job_id]
        [offer] = wire.offers[job_id]  # offered once, early
        assert offer["seq"] is None and offer["ack"].startswith(f"{S.PREFIX}.work.")
        ack = read_ack(wire.acks[offer["ack"]])
        [submitted] = [e for e in events if e.id == job_id and e.type == "submitted"]
        [started] = [e for e in events if e.id == job_id and e.type == "started"]
        assert isinstance(ack, Ack) and ack.seq == submitted.seq and not ack.duplicate
        assert offer["ack"].split(".")[2] == started.data["worker"]


async def test_a_duplicate_submission_offered_early_runs_once_and_frees_its_slot(
        make_stack: StackFactory, client: Client) -> None:
    """The second submission of a job id reaches the sentinel (no msg id: JF_SUBMIT does
    not deduplicate it); its early offer's append is refused, the worker drops the offer
    on that ack, and the sentinel frees the one slot: the next job is offered early too."""
    stack = await make_stack(workers=1, concurrency=1, worker_args=["--prefetch", "0"])
    await stack.wait_for_workers(1, 0, 30)
    nc, wire = await watch(url_of(client))
    try:
        body = orjson.dumps({"handler": "echo", "args": {"n": 1}, "job_id": "dup-1"})
        await nc.publish(S.submit_subject("default"), body)
        assert (await client.wait("dup-1", timeout=30)).state == "succeeded"
        # A job after it: run on the one slot, so the sentinel has seen dup-1 end (and
        # forgotten it, as it does every finished job) before the duplicate comes.
        between = await client.submit("echo", {"n": 0})
        assert (await client.wait(between, timeout=30)).state == "succeeded"
        before = len(wire.offers["dup-1"])  # (a first run's offer may be made again)
        await nc.publish(S.submit_subject("default"), body)
        await wait_until(lambda: _offered_early(wire, "dup-1", before), 20,
                         "the duplicate's early offer")
        [again] = [o for o in wire.offers["dup-1"][before:] if "ack" in o]
        await wait_until(lambda: _acked(wire, again["ack"]), 20, "its ack")
        refused = read_ack(wire.acks[again["ack"]])
        assert not isinstance(refused, Ack) or refused.duplicate
        later = await client.submit("echo", {"n": 2})
        assert (await client.wait(later, timeout=30)).state == "succeeded"
        [offer] = wire.offers[later]
        assert offer["seq"] is None, "the duplicate's slot was not freed"
    finally:
        await nc.close()
    started = Counter(e.id for e in await read_log(url_of(client), ["jf.job.*.started"]))
    assert started["dup-1"] == 1


async def _offered_early(wire: Wire, job_id: str, after: int) -> bool:
    return any("ack" in o for o in wire.offers.get(job_id, [])[after:])


async def _acked(wire: Wire, subject: str) -> bool:
    return subject in wire.acks


async def test_a_worker_claims_by_an_ack_that_came_before_its_offer_and_drops_a_late_one(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: Any) -> None:
    """No sentinel: the test plays it. A job's ``submitted`` is in the log; the ack naming
    its sequence reaches the worker before the offer does: the job runs. An offer whose
    ack never comes is held, listed in the heartbeat, then dropped."""
    monkeypatch.setattr(worker_module, "EARLY_ACK_WAIT_S", 0.5)
    nc = await connect(server.url)
    worker = await Worker(server.url, handlers="echo", concurrency=2, heartbeat_s=0.2,
                          data_dir=tmp_path / "w").start()
    beats: list[dict[str, Any]] = []

    def on_beat(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        beats.append(orjson.loads(data))
    try:
        await nc.subscribe_raw(S.heartbeat_subject(worker.worker_id), on_beat)
        log = EventLog(Publisher(nc))
        submitted = Event("job", "early-1", "submitted", time.time(), {
            "queue": "default", "handler": "echo", "args": {"x": 1}, "priority": 0,
            "max_attempts": 3, "queued": True})
        ack = await log.append(submitted, expected_seq=0)
        subject = f"{S.work_ack_prefix(worker.worker_id, 'test')}.1"
        await nc.publish(subject, orjson.dumps({"stream": S.EVENTS_STREAM, "seq": ack.seq}))
        await nc.flush()
        await asyncio.sleep(0.2)  # the ack is there first
        await nc.publish(S.work_subject(worker.worker_id), orjson.dumps([_offer(
            "early-1", subject)]))
        await wait_until(lambda: _has(server.url, "early-1", "succeeded"), 20,
                         "the job run by its early ack")
        lost = f"{S.work_ack_prefix(worker.worker_id, 'test')}.2"
        await nc.publish(S.work_subject(worker.worker_id),
                         orjson.dumps([_offer("never-acked", lost)]))
        await wait_until(lambda: _beat_holds(beats, "never-acked"), 10, "held in a beat")
        await asyncio.sleep(0.8)
        count = len(beats)
        await wait_until(lambda: _beat_after(beats, count, "never-acked"), 10,
                         "a beat that no longer holds it")
        await nc.publish(lost, orjson.dumps({"stream": S.EVENTS_STREAM, "seq": 1}))
        await asyncio.sleep(0.5)
        assert "never-acked" not in worker.running  # dropped: a late ack runs nothing
    finally:
        await worker.drain()
        await nc.close()
    types = [e.type for e in await read_log(server.url, ["jf.job.early-1.>"])]
    assert types == ["submitted", "started", "succeeded"]
    assert await read_log(server.url, ["jf.job.never-acked.>"]) == []


def _offer(job_id: str, ack: str) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": 1, "seq": None, "ack": ack, "queue": "default",
            "handler": "echo", "args": {"x": 1}, "priority": 0, "timeout_s": None,
            "correlation_id": None, "headers": {}}


async def _has(url: str, job_id: str, type_: str) -> bool:
    return any(e.type == type_ for e in await read_log(url, [f"{S.PREFIX}.job.{job_id}.>"]))


async def _beat_holds(beats: list[dict[str, Any]], job_id: str) -> bool:
    return any(job_id in b["held"] for b in beats)


async def _beat_after(beats: list[dict[str, Any]], count: int, job_id: str) -> bool:
    return any(job_id not in b["held"] for b in beats[count:])
