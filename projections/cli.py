"""`jetflow` commands that read: the projections (status, workers, jobs, job), a job's
history straight from the stream, and the replay tooling (replay, verify, export).

Read commands print human tables by default, ``--json`` for machines and ``--watch`` to
refresh; they read ``--db`` (default ``<data>/projections.sqlite``) and say clearly what
to do when it is missing or from another schema version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import nats.errors
from rich.console import RenderableType
from rich.live import Live

from core.argtypes import positive_int, seconds
from core.bus import BusError
from core.subjects import check_token
from projections.queries import STATE_ORDER
from projections.schema import ProjectionError

__all__ = ["add_commands"]

Producer = Callable[[aiosqlite.Connection], Awaitable[tuple[Any, RenderableType]]]


def _db_path(a: argparse.Namespace) -> Path:
    return Path(a.db) if a.db else Path(a.data) / "projections.sqlite"


async def _show(a: argparse.Namespace, produce: Producer) -> int:
    """Print once, or again every ``--watch`` seconds until Ctrl-C."""
    from projections.render import console
    from projections.store import open_reader

    db = await open_reader(_db_path(a))
    out = console()
    try:
        if a.watch and not a.json and out.is_terminal:
            with Live(console=out, auto_refresh=False) as live:
                while True:
                    live.update((await produce(db))[1], refresh=True)
                    await asyncio.sleep(a.watch)
        while True:
            data, view = await produce(db)
            if a.json:
                print(json.dumps(data), flush=True)
            else:
                out.print(view)
            if not a.watch:
                return 0
            await asyncio.sleep(a.watch)
    finally:
        await db.close()


# -- the projections ---------------------------------------------------------------------

async def cmd_status(a: argparse.Namespace) -> int:
    from projections.queries import queue_view
    from projections.render import status_view

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        view = await queue_view(db, minutes=a.minutes)
        return view, status_view(view)

    return await _show(a, produce)


async def cmd_workers(a: argparse.Namespace) -> int:
    from projections.queries import as_of, worker_view
    from projections.render import workers_view

    beats = _Heartbeats(None if a.no_heartbeats else a.nats)

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        workers, position = await worker_view(db), await as_of(db)
        if position["snapshot"]:  # the past: today's heartbeats do not belong next to it
            beats.note = "a replay snapshot: live heartbeats not shown"
        else:
            await beats.overlay(workers)
        data = {"as_of": position, "workers": workers}
        return data, workers_view(workers, position, beats.note)

    try:
        return await _show(a, produce)
    finally:
        await beats.close()


class _Heartbeats:
    """Live heartbeats over the worker view (best effort: the view works without NATS)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.nc: Any = None
        self.note = "" if url else "heartbeats not read (--no-heartbeats)"

    async def overlay(self, workers: list[dict[str, Any]]) -> None:
        from projections.heartbeats import read_heartbeats
        from projections.queries import worker_status

        if self.url is None:
            return
        try:
            if self.nc is None:
                from core.bus import connect

                self.nc = await connect(self.url, name="jetflow-workers", wait_s=2.0)
            beats = await read_heartbeats(self.nc)
        except (BusError, OSError, TimeoutError, nats.errors.Error) as exc:
            self.note = f"heartbeats unavailable: {exc or type(exc).__name__}"
            return
        now = time.time()
        for w in workers:
            beat = beats.get(w["worker_id"])
            if beat is not None:
                w["last_heartbeat"] = beat.as_json(now)
                w["status"] = worker_status(w["recorded_status"], len(w["current_jobs"]),
                                            beat.draining)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def cmd_jobs(a: argparse.Namespace) -> int:
    from projections.queries import as_of, list_jobs
    from projections.render import jobs_view

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        jobs = await list_jobs(db, state=a.state, queue=a.queue, handler=a.handler,
                               limit=a.limit)
        position = await as_of(db)
        return {"as_of": position, "jobs": jobs}, jobs_view(jobs, position)

    return await _show(a, produce)


async def cmd_errors(a: argparse.Namespace) -> int:
    from projections.queries import as_of, list_errors
    from projections.render import errors_view

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        errors, position = await list_errors(db, limit=a.limit), await as_of(db)
        return {"as_of": position, "errors": errors}, errors_view(errors, position)

    return await _show(a, produce)


async def cmd_job(a: argparse.Namespace) -> int:
    """The projection's view of a job when it has it, else the stream's."""
    from core.render import job_json, job_lines

    check_token(a.job_id, "job id")
    found = await _job_from_projection(a) if (a.db or _db_path(a).exists()) else None
    if found is None:
        return await _print_history(a, source="stream", fallback=True)
    state, events, trace_id, seq, errors = found
    seqs = {e.seq for e in events}
    skipped = {u.seq: u.reason for u in errors if u.seq in seqs}
    unreadable = [u for u in errors if u.seq not in seqs]
    if a.json:
        print(json.dumps({**job_json(state, events, skipped, unreadable),
                          "trace_id": trace_id, "source": "projection", "as_of_seq": seq}))
    else:
        print("\n".join(job_lines(state, events, skipped, unreadable)))
        print(f"  (from the projection at seq {seq}"
              + (f", trace {trace_id})" if trace_id else ")"))
    return 0


async def _job_from_projection(a: argparse.Namespace) -> Any:
    from projections.queries import as_of, job_errors, job_from_projection
    from projections.store import open_reader

    db = await open_reader(_db_path(a))
    try:
        found, position = await job_from_projection(db, a.job_id), await as_of(db)
        if found is None and position["snapshot"]:  # not the present stream's job instead
            raise ProjectionError(f"no job {a.job_id!r} in the replay snapshot {_db_path(a)} "
                                  f"(`jetflow history {a.job_id}` reads the stream as it is "
                                  "now)")
        if found is None:
            return None
        return (*found, position["seq"], await job_errors(db, a.job_id))
    finally:
        await db.close()


async def cmd_history(a: argparse.Namespace) -> int:
    return await _print_history(a, source="stream")


async def _print_history(a: argparse.Namespace, *, source: str,
                         fallback: bool = False) -> int:
    """The job from its events in the stream; an event that may not happen is shown and
    marked as not applied, a message on its subjects that is no event as unreadable."""
    from core.client import JobError, connect
    from core.job import fold_skipping
    from core.render import job_json, job_lines

    check_token(a.job_id, "job id")
    client = await connect(a.nats)
    try:
        events, unreadable = await client.history_report(a.job_id)
    finally:
        await client.close()
    if not events and not unreadable:
        raise JobError(f"no job {a.job_id!r} in the log")
    job, skipped = fold_skipping(events, a.job_id)
    if a.json:
        print(json.dumps({**job_json(job, events, skipped, unreadable), "source": source}))
    else:
        print("\n".join(job_lines(job, events, skipped, unreadable)))
        if fallback:
            print("  (from the stream: the projection does not have this job)")
        if not events:
            print(f"  (no valid event of {a.job_id!r}: only unreadable messages)")
    return 0 if events else 1


# -- replay, verify, export ----------------------------------------------------------------

async def cmd_replay(a: argparse.Namespace) -> int:
    if a.verify:
        ignored = [flag for flag, value in (("--to-seq", a.to_seq), ("--until", a.until),
                                            ("--force", a.force)) if value]
        if ignored:
            print(f"error: --verify compares at the live projection's own sequence; it takes "
                  f"no {', '.join(ignored)}", file=sys.stderr)
            return 2
        return await _verify(a)
    if not a.db:
        print("error: replay needs --db NEW.sqlite (a new file), or --verify",
              file=sys.stderr)
        return 2
    return await _rebuild(a)


async def _rebuild(a: argparse.Namespace) -> int:
    from core.bus import connect
    from projections.fetcher import FetchError
    from projections.progress import progress_reporter
    from projections.replay import rebuild
    from projections.store import check_replaceable, remove_db

    path = Path(a.db)
    if path.exists() and not a.force:
        print(f"error: {path} exists; replay builds a new file (--force replaces it)",
              file=sys.stderr)
        return 1
    check_replaceable(path)  # a projection no projector is writing, nothing else
    remove_db(path)
    nc = await connect(a.nats, name="jetflow-replay")
    terminated: list[int] = []
    try:
        with progress_reporter("replay") as report, _terminate_cancels(terminated):
            result = await rebuild(nc, path, to_seq=a.to_seq, until=a.until,
                                   batch=a.batch, progress=report)
    except FetchError as exc:
        print(f"error: {exc}; {path} was not written", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        if not terminated:
            raise
        print(f"replay stopped (SIGTERM); {path} was not written", file=sys.stderr)
        return 143
    finally:
        await nc.close()
    summary = {"db": str(path), "events": result.events, "last_seq": result.last_seq,
               "seconds": round(result.seconds, 3), "events_per_s": round(result.rate)}
    print(json.dumps(summary) if a.json else
          f"rebuilt {path}: {result.events} events up to seq {result.last_seq} in "
          f"{result.seconds:.1f}s ({result.rate:,.0f} events/s); "
          f"`jetflow status --db {path}` shows the system as of then")
    for note in _range_notes(a, result.last_seq):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _range_notes(a: argparse.Namespace, last_seq: int) -> list[str]:
    """What the user may not expect of the range the replay covered."""
    notes = []
    if a.to_seq is not None and last_seq < a.to_seq:
        notes.append(f"--to-seq {a.to_seq} is past the end of the stream (seq {last_seq})")
    if a.until is not None and last_seq == 0:
        when = datetime.fromtimestamp(a.until, UTC).isoformat()
        notes.append(f"no event was stored at or before {when}: the file is empty")
    return notes


@contextlib.contextmanager
def _terminate_cancels(received: list[int]) -> Iterator[None]:
    """SIGTERM cancels the current task, so its cleanup runs as for Ctrl-C; ``received``
    is appended to when it has."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None

    def cancel() -> None:
        received.append(signal.SIGTERM)
        task.cancel()
    loop.add_signal_handler(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _verify(a: argparse.Namespace) -> int:
    from core.bus import connect
    from projections.fetcher import FetchError
    from projections.progress import progress_reporter
    from projections.verify import verify

    live = _db_path(a)
    nc = await connect(a.nats, name="jetflow-verify")
    try:
        with tempfile.TemporaryDirectory(prefix="jetflow-verify-") as tmp, \
                progress_reporter("verify") as report:
            result = await verify(nc, live, Path(tmp), batch=a.batch, progress=report)
    except FetchError as exc:
        print(f"error: {exc}; nothing was verified", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    _print_verify(result, live, a.json)
    return 0 if result.ok else 1


def _print_verify(result: Any, live: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": result.ok, "seq": result.seq, "tables": [
            {"table": t.table, "only_live": t.only_live, "only_rebuilt": t.only_rebuilt,
             "rows": [r.describe() for r in t.rows]} for t in result.tables]}))
        return
    if result.ok:
        print(f"verified {live} at seq {result.seq}: all {len(result.tables)} tables equal "
              "a rebuild from the stream")
        return
    print(f"{live} at seq {result.seq} DIFFERS from a rebuild from the stream:")
    for t in result.tables:
        if not t.equal:
            print(f"  {t.table}: {t.only_live} row(s) only in live, {t.only_rebuilt} only "
                  "in the rebuild")
            for row in t.rows:
                print(f"    {row.describe()}")


async def cmd_export(a: argparse.Namespace) -> int:
    from core.bus import connect
    from projections.export import export_parquet
    from projections.progress import progress_reporter

    nc = await connect(a.nats, name="jetflow-export")
    try:
        with progress_reporter("export") as report:
            result = await export_parquet(nc, Path(a.parquet), from_seq=a.from_seq,
                                          progress=report)
    finally:
        await nc.close()
    if not result.events:
        print(f"nothing to export: the stream holds no message at or after seq {a.from_seq}",
              file=sys.stderr)
        return 0
    print(f"exported {result.events} events (up to seq {result.last_seq}) to {a.parquet} "
          f"in {result.files} file(s), {result.seconds:.1f}s")
    return 0


# -- argument parsing ------------------------------------------------------------------------

def _unix_time(text: str) -> float:
    """Unix seconds, or ISO 8601 (``2026-11-22T03:17:31Z``; without a zone: local time)."""
    try:
        value = float(text)
    except ValueError:
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time after 1970")
    return value




def _projection_options(p: argparse.ArgumentParser, db_help: str = "projection file "
                        "(default <data>/projections.sqlite)") -> None:
    p.add_argument("--db", help=db_help)
    p.add_argument("--data", default=".jetflow", help="data directory (./.jetflow)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _read_options(p: argparse.ArgumentParser,
                  common: Callable[[argparse.ArgumentParser], None]) -> None:
    common(p)
    _projection_options(p)
    p.add_argument("--watch", nargs="?", type=seconds, const=2.0, default=None,
                   metavar="SECONDS", help="refresh every SECONDS (2) until Ctrl-C")


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    _add_views(sub, common)
    _add_job(sub, common)
    _add_replay(sub, common)


def _add_views(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("status", help="the queue view: jobs by state and priority, oldest "
                                      "queued job, outcomes per minute")
    _read_options(p, common)
    p.add_argument("--minutes", type=positive_int, default=5,
                   help="outcomes per minute over this many minutes (5)")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("workers", help="the worker view, with live heartbeats")
    _read_options(p, common)
    p.add_argument("--no-heartbeats", action="store_true",
                   help="do not read JF_HEARTBEATS (a replay snapshot never shows them)")
    p.set_defaults(run=cmd_workers)

    p = sub.add_parser("jobs", help="list jobs, the most recently changed first")
    _read_options(p, common)
    p.add_argument("--state", choices=STATE_ORDER, metavar="STATE",
                   help=f"one of {', '.join(STATE_ORDER)}")
    p.add_argument("--queue")
    p.add_argument("--handler")
    p.add_argument("--limit", type=positive_int, default=50, help="at most N jobs (50)")
    p.set_defaults(run=cmd_jobs)

    p = sub.add_parser("errors", help="projection errors: messages in the log the projector "
                                      "recorded instead of applying (latest first)")
    _read_options(p, common)
    p.add_argument("--limit", type=positive_int, default=50, help="at most N errors (50)")
    p.set_defaults(run=cmd_errors)


def _add_job(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("job", help="a job's state and full history (from the projection "
                                   "when it has the job, else from the stream)")
    common(p)
    _projection_options(p)
    p.add_argument("job_id")
    p.set_defaults(run=cmd_job)

    p = sub.add_parser("history", help="a job's history straight from the stream")
    common(p)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_history)


def _add_replay(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "replay", help="rebuild a projection from the stream (time travel), or --verify",
        description="Rebuild a projection from sequence 1 into a new file, up to the head, "
                    "--to-seq or --until (time travel: then `jetflow status --db FILE`). "
                    "The file is built as FILE.partial and appears only when complete. "
                    "--verify compares a rebuild with the live projection instead.")
    common(p)
    _projection_options(p, "the file to build (required); with --verify, the live "
                           "projection (default <data>/projections.sqlite)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--to-seq", type=positive_int, metavar="N", help="stop after sequence N")
    bound.add_argument("--until", type=_unix_time, metavar="TIME",
                       help="stop after the last event stored at or before TIME "
                            "(Unix seconds or ISO 8601)")
    p.add_argument("--verify", action="store_true",
                   help="rebuild into a temporary file and compare it table by table with "
                        "the live projection (--db) at its sequence; exit 1 on differences, "
                        "2 if it could not be done")
    p.add_argument("--force", action="store_true", help="replace an existing --db file")
    p.add_argument("--batch", type=positive_int, default=5000, help="events per transaction")
    p.set_defaults(run=cmd_replay)

    p = sub.add_parser("export", help="write the event log as Parquet, partitioned by day "
                                      "and event type")
    common(p)
    p.add_argument("--parquet", required=True, metavar="DIR", help="output directory")
    p.add_argument("--from-seq", type=positive_int, default=1, metavar="N",
                   help="start at sequence N (1)")
    p.set_defaults(run=cmd_export)
