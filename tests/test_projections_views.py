"""The projection without a broker: the pure fold of a batch, the SQLite store and the
applier over real files, batch-boundary invariance, the golden log, the small parsers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from jetflow.cli.progress import progress_reporter
from jetflow.cli.tables import status_view
from jetflow.core import subjects as S
from jetflow.core.codec import encode_event
from jetflow.core.events import Event
from jetflow.core.job import JobState
from jetflow.core.metadata import header_block
from jetflow.projections.applier import Applier, JobCache
from jetflow.projections.heartbeats import parse_heartbeat
from jetflow.projections.queries import worker_status
from jetflow.projections.schema import SCHEMA_VERSION, TABLES, ProjectionError
from jetflow.projections.store import Store, file_version, open_reader
from jetflow.projections.synthetic import synthetic_log
from jetflow.projections.verify import compare
from jetflow.projections.views import (
    JobView,
    Raw,
    WorkerView,
    fold_batch,
    job_row,
    job_view_from_row,
    trace_id_of,
)

GOLDEN = Path(__file__).parent / "golden"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def raw(seq: int, kind: str, id_: str, type_: str, at: float, tp: str | None = None,
        **data: Any) -> Raw:
    return Raw(seq, S.event_subject(kind, id_, type_),
               encode_event(Event(kind, id_, type_, at, data)), traced(tp))


def traced(traceparent: str | None) -> bytes | None:
    """The header block of a message carrying ``traceparent`` (None: no headers)."""
    return header_block({S.HDR_TRACEPARENT: traceparent}) if traceparent else None


def lifecycle(job_id: str = "j1", start: int = 1, worker: str = "w1") -> list[Raw]:
    return [
        raw(start, "job", job_id, "submitted", 100.0, TRACE, queue="q", handler="echo",
            args={"big": "x" * 100}, priority=7, max_attempts=2),
        raw(start + 1, "job", job_id, "queued", 101.0, attempt=1),
        raw(start + 2, "job", job_id, "started", 102.0, attempt=1, worker=worker, lease_s=5),
        raw(start + 3, "job", job_id, "failed", 103.0, attempt=1, error_type="E",
            message="boom", retryable=True),
        raw(start + 4, "job", job_id, "retry_scheduled", 104.0, attempt=2, not_before=105.0),
        raw(start + 5, "job", job_id, "queued", 105.0, attempt=2),
        raw(start + 6, "job", job_id, "started", 106.0, attempt=2, worker=worker, lease_s=5),
        raw(start + 7, "job", job_id, "succeeded", 130.0, attempt=2, worker=worker,
            result={"ok": True}),
    ]


def nothing(_id: str) -> None:
    return None


# -- the pure fold -------------------------------------------------------------------------

def test_fold_of_a_lifecycle() -> None:
    rows = fold_batch(lifecycle(), nothing, nothing)
    view = rows.jobs["j1"]
    s = view.state
    assert (s.state, s.attempt, s.worker, s.queue, s.priority) == ("succeeded", 2, "w1", "q", 7)
    assert (s.submitted_at, s.started_at, s.finished_at) == (100.0, 106.0, 130.0)
    assert view.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and view.queued_at == 105.0
    assert s.args is None  # the projection keeps no arguments; the timeline has them
    assert [t[0] for t in rows.timeline] == list(range(1, 9))
    assert json.loads(rows.timeline[0][5])["data"]["args"] == {"big": "x" * 100}
    assert rows.throughput == {("q", 1): [0, 1, 0], ("q", 2): [1, 0, 0]}
    assert rows.queue_states() == {("q", "succeeded"): 1}
    assert rows.queue_depth() == {}
    assert rows.workers["w1"].succeeded == 1 and rows.workers["w1"].failed == 1
    assert rows.workers["w1"].status == "unknown"  # credited before it was ever seen
    assert (rows.last_seq, rows.last_at, rows.errors) == (8, 130.0, [])


def test_fold_is_pure_and_deterministic() -> None:
    batch = lifecycle()
    before = JobView.of(JobState("j9", state="queued", queue="q", attempt=0))
    first = fold_batch(batch, lambda _j: before, nothing)
    second = fold_batch(batch, lambda _j: before, nothing)
    assert first == second
    assert before.state.state == "queued"  # the prior view is not mutated


def test_counters_move_by_the_net_change() -> None:
    queued = fold_batch(lifecycle()[:2], nothing, nothing)
    assert queued.queue_states() == {("q", "queued"): 1}
    assert queued.queue_depth() == {("q", 7): 1}
    rest = fold_batch(lifecycle()[2:], queued.jobs.get, nothing)
    assert rest.queue_states() == {("q", "queued"): -1, ("q", "succeeded"): 1}
    assert rest.queue_depth() == {("q", 7): -1}


def test_unusable_messages_become_errors_and_the_batch_goes_on() -> None:
    batch = [
        Raw(1, "jf.job.x.succeeded", b"garbage{"),
        Raw(2, "jf.job.y.exploded", b'{"type":"exploded","job_id":"y","v":1,"at":1,"data":{}}'),
        raw(3, "job", "z", "succeeded", 1.0, attempt=1, worker="w"),
        *lifecycle("ok", start=4)[:2],
        raw(6, "job", "ok", "queued", 1.0, attempt=2),
        raw(7, "job", "d", "submitted", 1.0, queue="q", handler="h", args={}, priority=0,
            max_attempts=1),
        raw(8, "job", "d", "queued", 1.0, attempt=1),
        raw(9, "job", "d", "dead_lettered", 1.0, reason="r"),
        raw(10, "job", "d", "queued", 1.0, attempt=1, max_attempts="many"),
    ]
    rows = fold_batch(batch, nothing, nothing)
    codes = {seq: code for seq, _subject, code, _reason, _raw in rows.errors}
    assert codes == {1: "invalid_json", 2: "unknown_type", 3: "illegal_transition",
                     6: "illegal_transition", 10: "apply_failed"}
    assert rows.errors[0][4] == "garbage{"
    assert rows.jobs["ok"].state.state == "queued"  # valid events around them still apply
    assert rows.jobs["d"].state.state == "dead_lettered"
    assert "z" not in rows.jobs and rows.last_seq == 10


def test_worker_lifecycle_and_forged_fields() -> None:
    batch = [
        raw(1, "worker", "w1", "joined", 10.0, handlers=["echo", 7], queues=["q"],
            concurrency=4, host="h", pid="not-a-pid"),
        *lifecycle("j", start=2, worker="w1"),
        raw(10, "worker", "w1", "lost", 200.0, reason="silent"),
        raw(11, "worker", "w1", "joined", 201.0, handlers=["echo"], queues=["q"],
            concurrency=4, host="h", pid=12),
        raw(12, "worker", "w1", "left", 300.0, reason="drained"),
    ]
    rows = fold_batch(batch, nothing, nothing)
    w = rows.workers["w1"]
    assert (w.status, w.left_at, w.reason, w.pid, w.joined_at) == ("stopped", 300.0, "drained",
                                                                  12, 201.0)
    assert (w.succeeded, w.failed) == (1, 1)
    first = fold_batch(batch[:1], nothing, nothing).workers["w1"]
    assert (first.handlers, first.pid, first.status) == ("echo,7", 0, "live")


def test_trace_ids() -> None:
    assert trace_id_of(TRACE) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01") \
        == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in (None, "", "garbage", "00-xyz-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
        assert trace_id_of(bad) is None


def test_job_rows_round_trip() -> None:
    view = fold_batch(lifecycle(), nothing, nothing).jobs["j1"]
    row = job_row(view)
    again = job_view_from_row(row[9], row[11], row[18])
    assert again == view and job_row(again) == row


def test_worker_status() -> None:
    assert worker_status("live", 0) == "idle"
    assert worker_status("live", 2) == "busy"
    assert worker_status("live", 2, draining=True) == "draining"
    assert worker_status("lost", 0, draining=True) == "lost"
    assert worker_status("stopped", 0) == "stopped"


def test_heartbeat_parsing() -> None:
    beat = parse_heartbeat("jf.hb.w1", b'{"at": 5, "running": ["a"], "free": 3, '
                                       b'"draining": true}')
    assert beat is not None and (beat.worker_id, beat.at, beat.running, beat.free,
                                 beat.draining) == ("w1", 5.0, ("a",), 3, True)
    assert parse_heartbeat("jf.hb.w1", b"nope") is None
    assert parse_heartbeat("jf.hb.w1", b'{"at": "yesterday"}') is None
    assert parse_heartbeat("jf.hb.w1", b'{"at": 1, "running": 5}').running == ()


def test_job_cache_forgets_finished_jobs_and_stays_bounded() -> None:
    cache = JobCache(capacity=3)
    running = JobView.of(JobState("a", state="running"))
    done = JobView.of(JobState("b", state="succeeded"))
    cache.remember({"a": running, "b": done})
    assert "a" in cache and "b" not in cache
    cache.remember({k: JobView.of(JobState(k, state="queued")) for k in "cdef"})
    assert len(cache) == 3 and "a" not in cache and cache.get("f") is not None


# -- the store and the applier on real files --------------------------------------------------

def dump(path: Path) -> dict[str, list[list[Any]]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {table: [list(r) for r in db.execute(
            f"SELECT * FROM {table} ORDER BY {', '.join(keys)}")]
            for table, keys in TABLES.items()}


def build(path: Path, raws: list[Raw], batch: int, cache_size: int = 50_000) -> Path:
    store = Store.open(path)
    try:
        applier = Applier(store, cache_size=cache_size)
        for i in range(0, len(raws), batch):
            applier.apply(raws[i:i + batch])
    finally:
        store.close()
    return path


def synthetic_raws(events: int, seed: int = 3) -> list[Raw]:
    return [Raw(i + 1, S.event_subject(e.kind, e.id, e.type), encode_event(e),
                header_block(h)) for i, (e, h) in
            enumerate(synthetic_log(events, seed=seed, in_flight=16))]


RAWS = synthetic_raws(1500)


@settings(max_examples=12, deadline=None)
@given(cuts=st.lists(st.integers(1, len(RAWS) - 1), max_size=12),
       cache_size=st.sampled_from([1, 7, 50_000]))
def test_batch_boundaries_and_evictions_do_not_change_the_rows(cuts: list[int],
                                                              cache_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        whole = build(Path(tmp) / "whole.sqlite", RAWS, batch=len(RAWS))
        store = Store.open(Path(tmp) / "cut.sqlite")
        applier = Applier(store, cache_size=cache_size)
        bounds = [0, *sorted(set(cuts)), len(RAWS)]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            applier.apply(RAWS[lo:hi])
        applier.apply(RAWS[:hi])  # a redelivery below the checkpoint changes nothing
        store.close()
        assert all(t.equal for t in compare(whole, store.path)), dump(store.path)["jobs"][:3]


def test_rows_agree_with_the_synthetic_log(tmp_path: Path) -> None:
    db = build(tmp_path / "p.sqlite", RAWS, batch=100)
    tables = dump(db)
    jobs = {r[0]: r for r in tables["jobs"]}
    counts: dict[tuple[str, str], int] = {}
    for r in jobs.values():
        counts[(r[1], r[4])] = counts.get((r[1], r[4]), 0) + 1
    assert {(q, s): n for q, s, n in tables["queue_states"]} == counts
    queued = [r for r in jobs.values() if r[4] == "queued"]
    assert sum(n for _q, _p, n in tables["queue_depth"]) == len(queued)
    assert len(tables["timeline"]) == len(RAWS) and tables["projection_errors"] == []
    assert sum(r[2] for r in tables["throughput"]) == sum(w[10] for w in tables["workers"])
    assert tables["checkpoint"] == [[1, len(RAWS), max(t[4] for t in tables["timeline"]),
                                     SCHEMA_VERSION]]


def golden_raws() -> list[Raw]:
    lines = (GOLDEN / "projection-mixed.jsonl").read_text().splitlines()
    return [Raw(o["seq"], o["subject"], o["data"].encode(), traced(o["traceparent"]))
            for o in map(json.loads, lines)]


def test_golden_log_gives_the_recorded_tables(tmp_path: Path) -> None:
    """A log recorded from a real run (successes, retries, dead letters, a run timeout, a
    rejection, a cancellation, hand-published garbage) and the tables it gave: a change
    of codec, apply or schema that alters them shows up here. JETFLOW_REGOLD=1 rewrites."""
    expected_file = GOLDEN / "projection-mixed.expected.json"
    got = dump(build(tmp_path / "g.sqlite", golden_raws(), batch=7))
    if os.environ.get("JETFLOW_REGOLD"):
        expected_file.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(expected_file.read_text())


def test_schema_versions(tmp_path: Path) -> None:
    db = tmp_path / "p.sqlite"
    build(db, lifecycle(), batch=100)
    assert file_version(db) == SCHEMA_VERSION
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("UPDATE checkpoint SET schema_version = ?", (SCHEMA_VERSION + 1,))
        con.commit()
    with pytest.raises(ProjectionError, match="newer"):
        Store.open(db)
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("UPDATE checkpoint SET schema_version = 1")
        con.commit()
    store = Store.open(db)  # older: deleted, to be rebuilt from the stream
    assert store.checkpoint() == (0, None)
    store.close()


async def test_readers_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ProjectionError, match="no projection at .*jetflow projector"):
        await open_reader(tmp_path / "missing.sqlite")
    (tmp_path / "other.sqlite").write_bytes(b"")
    with pytest.raises(ProjectionError, match="not a jetflow projection"):
        await open_reader(tmp_path / "other.sqlite")
    db = build(tmp_path / "p.sqlite", lifecycle(), batch=3)
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("UPDATE checkpoint SET schema_version = 99")
        con.commit()
    with pytest.raises(ProjectionError, match="schema v99.*upgrade jetflow"):
        await open_reader(db)


# -- output ----------------------------------------------------------------------------------

def test_status_table_renders_the_counts() -> None:
    view = {"as_of": {"seq": 9, "at": 130.0, "projection_errors": 1}, "window_minutes": 5,
            "queues": [{"queue": "q", "states": {"queued": 2, "succeeded": 3}, "total": 5,
                        "depth": {"7": 2}, "oldest_queued": {"job_id": "a", "queued_at": 1.0,
                                                              "age_s": 150.0},
                        "per_minute": [{"minute_start": 120, "succeeded": 10, "failed": 5,
                                        "dead_lettered": 0}]}]}
    out = Console(file=io.StringIO(), width=200, no_color=True)
    out.print(status_view(view))
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert "as of stream seq 9" in text and "1 projection error" in text
    for cell in ("queued", "succeeded", "2.5m", "2.0", "1.0", "p7"):
        assert cell in text


def test_plain_progress_lines() -> None:
    out = io.StringIO()
    with progress_reporter("replay", stream=out, every_s=0.0) as report:
        report(50, 100, 50)
        report(100, 100, 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("replay: seq 100/100 (100%), 100 events")
    assert "events/s" in lines[0] and "ETA" in lines[0]


def test_timeline_keeps_the_whole_event() -> None:
    rows = fold_batch(lifecycle(), nothing, nothing)
    body = orjson.loads(rows.timeline[-1][5])
    assert body["data"]["result"] == {"ok": True} and body["type"] == "succeeded"


def test_credit_for_an_unknown_worker_creates_its_row() -> None:
    rows = fold_batch(lifecycle(worker="ghost"), nothing, lambda _w: None)
    assert rows.workers["ghost"] == WorkerView("ghost", succeeded=1, failed=1)
