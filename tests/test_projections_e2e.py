"""Projections and replay against a real nats-server: rebuild equality after a real mixed
run, kill -9 of the projector, time travel, garbage in the log, --verify, the read
commands and the Parquet export. Real processes, real files, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from jetflow import Client, SubmissionRejected
from jetflow.adapters.bus import connect, ensure_streams
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.reader import StreamReader
from jetflow.core import subjects as S
from jetflow.core.codec import encode_event
from jetflow.core.events import Event
from jetflow.core.job import fold
from jetflow.core.subjects import EVENTS_STREAM
from jetflow.projections.projector import Projector
from jetflow.projections.replay import rebuild
from jetflow.projections.schema import SCHEMA_VERSION, TABLES
from jetflow.projections.store import Store
from jetflow.projections.synthetic import publish_log, synthetic_log
from jetflow.projections.verify import compare
from jetflow.up import Service
from tests.conftest import StackFactory, read_log, url_of, wait_until

pytestmark = pytest.mark.e2e

FAST_RETRY = ["--retry", "0.2,2,1"]


# -- helpers -----------------------------------------------------------------------------------

async def stream_head(url: str) -> int:
    nc = await connect(url)
    try:
        return int((await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq)
    finally:
        await nc.close()


def checkpoint(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            row = con.execute("SELECT last_seq FROM checkpoint").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


async def caught_up(db: Path, url: str, timeout_s: float = 30.0) -> int:
    target = await stream_head(url)

    async def done() -> bool:
        return checkpoint(db) >= target
    await wait_until(done, timeout_s, f"projection {db.name} at seq {target}")
    return target


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(sql, params).fetchall()


async def publish_synthetic(url: str, events: int, *, seed: int = 1, skip: int = 0) -> int:
    """Append events ``skip+1 .. events`` of a synthetic log; return the stream head."""
    nc = await connect(url)
    try:
        await ensure_streams(nc.jetstream())
        appends = synthetic_log(events, seed=seed, in_flight=32)
        await publish_log(nc, (a for i, a in enumerate(appends) if i >= skip))
        return int((await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq)
    finally:
        await nc.close()


async def project(url: str, db: Path) -> int:
    """Run a projector in this process until it has applied the whole stream."""
    async with Projector(url, db, idle_s=0.2):
        return await caught_up(db, url)


async def cli(url: str, *args: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", *args, "--nats", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def rebuilt_equal(url: str, live: Path, fresh: Path) -> None:
    nc = await connect(url)
    try:
        await rebuild(nc, fresh, to_seq=checkpoint(live))
    finally:
        await nc.close()
    diffs = [t for t in compare(live, fresh) if not t.equal]
    assert not diffs, "\n".join(f"{t.table}: {[r.describe() for r in t.rows]}" for t in diffs)


# -- a real run ----------------------------------------------------------------------------

async def test_rebuild_equals_the_live_projection_after_a_mixed_run(
        make_stack: StackFactory, client: Client, tmp_path: Path) -> None:
    stack = await make_stack(workers=1, projector=True, sentinel_args=FAST_RETRY)
    live = stack.data_dir / "projections.sqlite"
    ok = [await client.submit("echo", {"i": i}, priority=i % 3) for i in range(6)]
    retried = await client.submit("fail", {"message": "boom"}, max_attempts=2)
    permanent = await client.submit("fail", {"message": "no", "permanent": True})
    with pytest.raises(SubmissionRejected):
        await client.submit("no-such-handler", {})
    await client.publish_raw("default", b"{not json")
    for job_id in ok:
        assert (await client.wait(job_id, timeout=30)).state == "succeeded"
    for job_id in (retried, permanent):
        assert (await client.wait(job_id, timeout=30)).state == "dead_lettered"

    async def two_rejections() -> bool:
        log = await read_log(stack.url, [f"{S.PREFIX}.job.*.rejected"])
        return len(log) == 2
    await wait_until(two_rejections, 20, "both rejections in the log")
    await caught_up(live, stack.url)

    states = dict(query(live, "SELECT state, jobs FROM queue_states WHERE queue = 'default'"))
    assert states == {"succeeded": 6, "dead_lettered": 2, "rejected": 2}
    (succeeded, failed), = query(live, "SELECT succeeded, failed FROM workers")
    assert (succeeded, failed) == (6, 3)  # the retried job failed twice
    assert query(live, "SELECT attempt, error FROM jobs WHERE job_id = ?", retried)[0][0] == 2
    assert sorted(query(live, "SELECT handler FROM jobs WHERE state = 'rejected'")) == \
        [("",), ("no-such-handler",)]  # as the body named it; garbage names none
    code, out, _ = await cli(stack.url, "jobs", "--json", "--handler", "no-such-handler",
                             "--data", str(stack.data_dir))
    assert [j["state"] for j in json.loads(out)["jobs"]] == ["rejected"]
    await rebuilt_equal(stack.url, live, tmp_path / "rebuilt.sqlite")
    code, out, err = await cli(stack.url, "replay", "--verify", "--db", str(live))
    assert code == 0 and f"all {len(TABLES)} tables equal" in out, out + err


# A projector whose third batch dies by SIGKILL in the middle of its transaction, after
# some of the batch's rows are written: fault injection at an exact point, real kill -9.
KILL_MID_TRANSACTION = """
import asyncio, os, signal, sys
from pathlib import Path
from jetflow.projections import store
from jetflow.projections.projector import Projector

writes = 0
original = store.Store.write

def write(self, rows):
    global writes
    writes += 1
    if writes == 3:
        self.db.execute("BEGIN")
        for sql, params in store._statements(rows)[:3]:
            if params:
                self.db.executemany(sql, params)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, rows)

store.Store.write = write

async def main():
    async with Projector(sys.argv[1], Path(sys.argv[2]), batch=1000):
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_killed_projector_resumes_exactly_where_it_was(server: EmbeddedServer,
                                                            tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 40_000)
    live = tmp_path / "live.sqlite"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILL_MID_TRANSACTION,
                                                server.url, str(live))
    assert await asyncio.wait_for(proc.wait(), 30) == -9
    assert checkpoint(live) == 2000  # two whole batches; the third rolled back
    assert query(live, "SELECT count(*), max(seq) FROM timeline") == [(2000, 2000)]
    seen = checkpoint(live)
    for _ in range(3):  # kill -9 of the real service at three points of the backlog
        projector = await Service("projector", ["projector", "--db", str(live)], server.url,
                                  tmp_path / "logs").start()
        started = seen

        async def moved(since: int = started) -> bool:
            return checkpoint(live) > since + 2000
        await wait_until(moved, 30, "the projector moving on")
        await projector.kill()
        seen = checkpoint(live)
        assert seen < head, "the backlog was applied before the kill; make it larger"
    projector = await Service("projector", ["projector", "--db", str(live)], server.url,
                              tmp_path / "logs").start()
    try:
        await caught_up(live, server.url, timeout_s=60)
    finally:
        await projector.stop()
    assert query(live, "SELECT count(*), min(seq), max(seq) FROM timeline")[0] == (head, 1,
                                                                                   head)
    await rebuilt_equal(server.url, live, tmp_path / "clean.sqlite")


async def test_time_travel_gives_the_counts_at_a_sequence(server: EmbeddedServer,
                                                          tmp_path: Path) -> None:
    cut = await publish_synthetic(server.url, 1700)
    await asyncio.sleep(0.05)  # a gap in stored time between the two halves
    head = await publish_synthetic(server.url, 3000, skip=1700)
    assert (cut, head) == (1700, 3000)
    expected = expected_view(await read_log(server.url), cut)

    back = tmp_path / "at-1700.sqlite"
    code, out, err = await cli(server.url, "replay", "--db", str(back), "--to-seq", str(cut))
    assert code == 0 and f"up to seq {cut}" in out, out + err
    assert "replay: seq 1700/1700 (100%)" in err  # plain progress lines off a terminal
    code, out, err = await cli(server.url, "status", "--db", str(back), "--json")
    assert code == 0, err
    assert status_summary(json.loads(out)) == expected

    nc = await connect(server.url)
    stored = (await nc.jetstream().get_msg(EVENTS_STREAM, cut)).time
    await nc.close()
    assert stored is not None
    until = tmp_path / "until.sqlite"
    code, out, err = await cli(server.url, "replay", "--db", str(until), "--until",
                               str(stored.timestamp() + 0.01))
    assert code == 0 and f"up to seq {cut}" in out, out + err
    assert not [t for t in compare(back, until) if not t.equal]

    # a snapshot says so, and shows nothing of the present next to the past
    code, out, _ = await cli(server.url, "workers", "--db", str(back), "--json")
    assert json.loads(out)["as_of"]["snapshot"] is True
    code, out, _ = await cli(server.url, "workers", "--db", str(back))
    assert "replay snapshot of stream seq 1700" in out and "live heartbeats not shown" in out
    later = next(e.id for e in reversed(await read_log(server.url)) if e.kind == "job")
    assert not query(back, "SELECT 1 FROM jobs WHERE job_id = ?", later)
    code, _, err = await cli(server.url, "job", later, "--db", str(back))
    assert code == 1 and f"no job {later!r} in the replay snapshot" in err, err
    async with Projector(server.url, back, idle_s=0.2):  # a projector takes it on: live
        await caught_up(back, server.url)
    code, out, _ = await cli(server.url, "status", "--db", str(back), "--json")
    assert json.loads(out)["as_of"]["snapshot"] is False


def expected_view(events: list[Any], upto: int) -> dict[str, Any]:
    """The queue view at ``upto``, computed independently with jetflow.core.job.fold."""
    by_job: dict[str, list[Any]] = {}
    for e in events:
        if e.kind == "job" and e.seq <= upto:
            by_job.setdefault(e.id, []).append(e)
    jobs = {job_id: fold(evs, job_id) for job_id, evs in by_job.items()}
    queued_at = {job_id: max(e.at for e in evs if e.type == "queued")
                 for job_id, evs in by_job.items() if jobs[job_id].state == "queued"}
    last_at = max(e.at for e in events if e.seq <= upto)
    oldest: dict[str, tuple[str, float]] = {}
    for job_id, at in sorted(queued_at.items(), key=lambda kv: (kv[1], kv[0])):
        oldest.setdefault(jobs[job_id].queue, (job_id, round(last_at - at, 6)))
    return {
        "states": dict(Counter(f"{j.queue}/{j.state}" for j in jobs.values())),
        "depth": dict(Counter(f"{j.queue}/{j.priority}" for j in jobs.values()
                              if j.state == "queued")),
        "oldest": oldest,
    }


def status_summary(view: dict[str, Any]) -> dict[str, Any]:
    return {
        "states": {f"{q['queue']}/{s}": n for q in view["queues"] for s, n in q["states"].items()},
        "depth": {f"{q['queue']}/{p}": n for q in view["queues"] for p, n in q["depth"].items()},
        "oldest": {q["queue"]: (q["oldest_queued"]["job_id"],
                                round(q["oldest_queued"]["age_s"], 6))
                   for q in view["queues"] if q["oldest_queued"]},
    }


# -- bad input and tampering --------------------------------------------------------------------

async def test_garbage_is_recorded_and_later_events_still_apply(server: EmbeddedServer,
                                                                tmp_path: Path) -> None:
    await publish_synthetic(server.url, 200)
    nc = await connect(server.url)
    await nc.jetstream().publish("jf.job.x.succeeded", b"\x00 not an event")
    await nc.jetstream().publish("jf.job.x.succeeded",
                                 b'{"type":"succeeded","job_id":"x","v":1,"at":1,"data":{}}')
    await nc.close()
    head = await publish_synthetic(server.url, 400, skip=200)
    db = tmp_path / "p.sqlite"
    await project(server.url, db)
    errors = query(db, "SELECT seq, subject, code FROM projection_errors ORDER BY seq")
    assert errors == [(201, "jf.job.x.succeeded", "invalid_json"),
                      (202, "jf.job.x.succeeded", "bad_field")]
    assert query(db, "SELECT max(seq) FROM timeline")[0][0] == head
    last, _headers = list(synthetic_log(400, seed=1, in_flight=32))[-1]
    assert query(db, "SELECT last_seq FROM jobs WHERE job_id = ?", last.id) == [(head,)]
    code, out, _ = await cli(server.url, "status", "--db", str(db))
    assert code == 0 and "2 projection error(s): `jetflow errors` lists them" in out
    code, out, _ = await cli(server.url, "errors", "--db", str(db), "--json")
    assert [(e["seq"], e["code"]) for e in json.loads(out)["errors"]] == [
        (202, "bad_field"), (201, "invalid_json")]
    code, out, _ = await cli(server.url, "errors", "--db", str(db), "--limit", "1")
    assert code == 0 and "bad_field" in out and "invalid_json" not in out


async def test_verify_finds_a_deliberately_altered_row(server: EmbeddedServer,
                                                       tmp_path: Path) -> None:
    await publish_synthetic(server.url, 600)
    live = tmp_path / "live.sqlite"
    await project(server.url, live)
    code, out, err = await cli(server.url, "replay", "--verify", "--db", str(live))
    assert code == 0, out + err
    (job_id,), = query(live, "SELECT job_id FROM jobs WHERE state = 'succeeded' LIMIT 1")
    with contextlib.closing(sqlite3.connect(live)) as con:
        con.execute("UPDATE jobs SET state = 'running' WHERE job_id = ?", (job_id,))
        con.execute("DELETE FROM timeline WHERE seq = 5")
        con.commit()
    code, out, err = await cli(server.url, "replay", "--verify", "--db", str(live))
    assert code == 1, out + err
    assert f"job_id={job_id!r}: state: live='running' rebuilt='succeeded'" in out
    assert "seq=5: missing from the live projection" in out
    code, out, _ = await cli(server.url, "replay", "--verify", "--db", str(live), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert {t["table"] for t in report["tables"] if t["rows"]} == {"jobs", "timeline"}


# -- the read commands -----------------------------------------------------------------------

async def test_read_commands(make_stack: StackFactory, client: Client, tmp_path: Path) -> None:
    stack = await make_stack(workers=1, projector=True)
    url = url_of(client)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    done = await client.submit("echo", {"hi": 1}, headers={"traceparent": trace},
                               queue="default")
    assert (await client.wait(done, timeout=20)).state == "succeeded"
    live = stack.data_dir / "projections.sqlite"
    await caught_up(live, url)
    data = ["--data", str(stack.data_dir)]

    code, out, err = await cli(url, "job", done, "--json", *data)
    job = json.loads(out)
    assert code == 0 and job["source"] == "projection" and job["state"] == "succeeded"
    assert job["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert [e["type"] for e in job["events"]] == ["submitted", "started", "succeeded"]
    assert job["result"] == {"hi": 1} and job["events"][0]["data"]["args"] == {"hi": 1}
    code, out, _ = await cli(url, "history", done, "--json")
    history = json.loads(out)
    assert history["source"] == "stream"
    assert history["events"] == job["events"] and history["state"] == "succeeded"
    code, out, _ = await cli(url, "job", done, "--json", "--data", str(tmp_path / "none"))
    assert code == 0 and json.loads(out)["source"] == "stream"  # no projection: the stream

    code, out, _ = await cli(url, "jobs", "--json", "--state", "succeeded", *data)
    assert [j["job_id"] for j in json.loads(out)["jobs"]] == [done]
    code, out, _ = await cli(url, "jobs", "--json", "--handler", "nope", *data)
    assert json.loads(out)["jobs"] == []
    code, out, _ = await cli(url, "workers", "--json", *data)
    (worker,) = json.loads(out)["workers"]
    assert worker["status"] == "idle" and worker["succeeded"] == 1
    assert worker["last_heartbeat"] is not None and worker["last_heartbeat"]["age_s"] < 10
    code, out, _ = await cli(url, "workers", *data)
    assert code == 0 and "idle" in out and "ago" in out
    code, out, _ = await cli(url, "jobs", *data)
    assert code == 0 and done in out

    code, _, err = await cli(url, "status", "--data", str(tmp_path / "none"))
    assert code == 1 and "no projection at" in err and "--data DIR" in err
    assert "run `jetflow projector`" not in err  # (not: start a second stack)
    # with --json a failure is JSON on stdout too, for the program reading it
    code, out, err = await cli(url, "status", "--json", "--data", str(tmp_path / "none"))
    assert code == 1 and err == "" and "no projection at" in json.loads(out)["error"]
    code, out, err = await cli(url, "history", "ghost", "--json")
    assert (code, err, json.loads(out)) == (1, "", {"error": "no job 'ghost' in the log"})
    code, out, err = await cli(url, "history", "ghost")
    assert (code, out, err) == (1, "", "error: no job 'ghost' in the log\n")
    code, out, err = await cli(url, "cancel", "ghost", "--json")
    assert code == 1 and err == "" and "ghost" in json.loads(out)["error"]
    with contextlib.closing(sqlite3.connect(live)) as con:
        con.execute("UPDATE checkpoint SET schema_version = 99")
        con.commit()
    code, _, err = await cli(url, "status", *data)
    assert code == 1 and "schema v99" in err and "upgrade jetflow" in err


async def test_history_shows_what_the_state_machine_did_not_apply(
        server: EmbeddedServer, tmp_path: Path) -> None:
    """Hand-published events on a job's subjects: a well-formed one that may not happen
    and one that is no event. The history shows both, marked, instead of failing."""
    nc = await connect(server.url)
    js = nc.jetstream()
    await ensure_streams(js)
    await js.publish("jf.job.lone.succeeded", encode_event(
        Event("job", "lone", "succeeded", 1.5, {"attempt": 1, "worker": "w", "result": 7})))
    await js.publish("jf.job.lone.progress", b"{not json")
    await nc.close()

    code, out, err = await cli(server.url, "history", "lone")
    assert code == 0, err
    assert "job lone: new" in out
    assert "succeeded" in out and "[not applied: 'succeeded' is not allowed in state 'new']" in out
    assert "(unreadable)" in out and "jf.job.lone.progress: invalid_json" in out
    code, out, _ = await cli(server.url, "history", "lone", "--json")
    report = json.loads(out)
    assert report["events"][0]["not_applied"] and report["unreadable"][0]["seq"] == 2
    db = tmp_path / "p.sqlite"
    await project(server.url, db)
    code, out, _ = await cli(server.url, "job", "lone", "--db", str(db))
    assert code == 0 and "from the stream: the projection does not have this job" in out
    await publish_synthetic(server.url, 300)
    await project(server.url, db)
    (job_id,), = query(db, "SELECT job_id FROM jobs WHERE state = 'succeeded' LIMIT 1")
    nc = await connect(server.url)
    await nc.jetstream().publish(f"jf.job.{job_id}.started", encode_event(
        Event("job", job_id, "started", 2.0, {"attempt": 9, "worker": "w", "lease_s": 1.0})))
    await nc.close()
    await project(server.url, db)
    code, out, _ = await cli(server.url, "job", job_id, "--db", str(db))
    assert code == 0 and "(not applied)" in out and "illegal_transition" in out, out

    for bad in ("bad id*", "a.b"):
        code, _, err = await cli(server.url, "history", bad)
        assert code == 1 and "error: invalid job id" in err and "Traceback" not in err
        code, _, err = await cli(server.url, "job", bad, "--db", str(db))
        assert code == 1 and "error: invalid job id" in err and "Traceback" not in err


async def test_replay_refuses_what_it_must_not_replace(server: EmbeddedServer,
                                                       tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 300)
    live = tmp_path / "live.sqlite"
    async with Projector(server.url, live, idle_s=0.2):
        await caught_up(live, server.url)
        code, _, err = await cli(server.url, "replay", "--db", str(live), "--force")
        assert code == 1 and "being written by another process" in err, err
        code, _, err = await cli(server.url, "projector", "--db", str(live))  # a second one
        assert code == 1 and "being written by another process" in err, err
    assert checkpoint(live) == head  # the live file was left alone

    theirs = tmp_path / "theirs.sqlite"
    with contextlib.closing(sqlite3.connect(theirs)) as con:
        con.execute("CREATE TABLE precious (x)")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for target, why in ((theirs, "not a jetflow projection"), (notes, "not an SQLite file"),
                        (tmp_path, "not a regular file")):
        code, _, err = await cli(server.url, "replay", "--db", str(target), "--force")
        assert code == 1 and why in err and "Traceback" not in err, err
        code, _, err = await cli(server.url, "projector", "--db", str(target))
        assert code == 1 and why in err and "Traceback" not in err, err
    assert notes.read_text() == "keep me" and query(theirs, "SELECT count(*) FROM precious")

    code, _, err = await cli(server.url, "replay", "--db", str(live), "--force",
                             "--to-seq", str(head + 50))
    assert code == 0 and f"past the end of the stream (seq {head})" in err
    assert checkpoint(live) == head
    code, _, err = await cli(server.url, "replay", "--db", str(tmp_path / "early.sqlite"),
                             "--until", "1")
    assert code == 0 and "no event was stored at or before 1970" in err
    code, _, err = await cli(server.url, "replay", "--verify", "--db", str(live),
                             "--to-seq", "5")
    assert code == 2 and "takes no --to-seq" in err
    building = Store.open(tmp_path / "busy.sqlite.partial", bulk=True)  # a replay at work
    try:
        code, _, err = await cli(server.url, "replay", "--db", str(tmp_path / "busy.sqlite"))
        assert code == 1 and "being written by another process" in err, err
    finally:
        building.close()
    os.mkfifo(tmp_path / "fifo")
    for args in (["status", "--db", str(tmp_path / "fifo")],
                 ["replay", "--db", str(notes / "x.sqlite")],
                 ["projector", "--db", str(notes / "x.sqlite")],
                 ["trace", "a.b"]):
        code, _, err = await cli(server.url, *args)
        assert code == 1 and err.startswith("error: ") and "Traceback" not in err, (args, err)
    for args in (["replay", "--db", "x", "--until", "nan"], ["status", "--watch", "-1"],
                 ["jobs", "--limit", "abc"], ["jobs", "--state", "bogus"],
                 ["submit", "echo", "--timeout", "nan"], ["submit", "echo", "--timeout", "-1"]):
        code, _, err = await cli(server.url, *args)
        assert code == 2 and "Traceback" not in err and "_positive" not in err, (args, err)


async def test_a_terminated_replay_leaves_no_file(server: EmbeddedServer,
                                                  tmp_path: Path) -> None:
    await publish_synthetic(server.url, 20_000)
    target = tmp_path / "big.sqlite"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "replay", "--db", str(target), "--batch", "50",
        "--nats", server.url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def building() -> bool:
        return checkpoint(target.with_name("big.sqlite.partial")) > 0
    await wait_until(building, 30, "the replay to start writing")
    proc.terminate()
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 143, err.decode()
    assert "big.sqlite was not written" in err.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srv"]


async def test_projector_rebuilds_a_file_of_an_older_schema(server: EmbeddedServer,
                                                            tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 300)
    db = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.executescript("CREATE TABLE checkpoint (id INTEGER PRIMARY KEY, last_seq INTEGER,"
                          " schema_version INTEGER); INSERT INTO checkpoint VALUES (1, 250, 1);"
                          "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, state_json TEXT);")
    await project(server.url, db)
    assert query(db, "SELECT last_seq, schema_version FROM checkpoint") == [
        (head, SCHEMA_VERSION)]
    assert query(db, "SELECT count(*) FROM timeline") == [(head,)]


# -- export and the reader ---------------------------------------------------------------------

async def test_export_to_parquet(server: EmbeddedServer, tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 500)
    nc = await connect(server.url)
    await nc.jetstream().publish("jf.job.x.succeeded", b"garbage")
    await nc.close()
    out_dir = tmp_path / "parquet"
    code, out, err = await cli(server.url, "export", "--parquet", str(out_dir))
    assert code == 0 and f"exported {head + 1} events" in out, out + err
    table = pads.dataset(out_dir, partitioning="hive").to_table()
    assert table.num_rows == head + 1 and sorted(table["seq"].to_pylist()) == \
        list(range(1, head + 2))
    types = Counter(table["type"].to_pylist())
    assert types["submitted"] > 0 and types["joined"] == 4
    bad = table.filter(pads.field("seq") == head + 1).to_pylist()[0]
    assert bad["error"].startswith("invalid_json") and bad["data"] == "garbage"
    assert {p.name.split("=")[0] for p in out_dir.iterdir()} == {"day"}
    again = tmp_path / "tail"
    code, out, _ = await cli(server.url, "export", "--parquet", str(again), "--from-seq", "401")
    assert code == 0
    assert pads.dataset(again, partitioning="hive").to_table().num_rows == head + 1 - 400
    code, _, err = await cli(server.url, "export", "--parquet", str(again), "--from-seq",
                             str(head + 50))
    assert code == 0 and f"no message at or after seq {head + 50}" in err


async def test_reader_carries_on_after_its_consumer_is_deleted(server: EmbeddedServer) -> None:
    head = await publish_synthetic(server.url, 3000)
    nc = await connect(server.url)
    reader = StreamReader(nc, EVENTS_STREAM, batch=500, idle_s=0.2)
    started = time.monotonic()
    seqs: list[int] = []
    try:
        async for msgs in reader.batches():
            seqs += [m.seq for m in msgs]
            if len(seqs) == 500 and msgs:
                await nc.jetstream().delete_consumer(EVENTS_STREAM, reader._consumer)
            if reader.next_seq > head or time.monotonic() - started > 20:
                break
    finally:
        await reader.close()
        await nc.close()
    assert seqs == list(range(1, head + 1))
    assert time.monotonic() - started < 5  # noticed within a second or so
