"""The replay tooling: ``jetflow replay`` (rebuild a projection from the stream, up to
a sequence or a time: time travel), ``replay --verify`` (compare a rebuild with the live
projection) and ``jetflow export`` (the log as Parquet)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jetflow.adapters.natsclient import Client
from jetflow.cli.options import (
    common_options,
    positive_int,
    projection_options,
    unix_time,
)
from jetflow.cli.output import error
from jetflow.cli.projection import projection_path
from jetflow.core import subjects as S

__all__ = ["add_commands"]


async def cmd_replay(a: argparse.Namespace) -> int:
    if a.verify:
        ignored = [flag for flag, value in (("--to-seq", a.to_seq), ("--until", a.until),
                                            ("--force", a.force)) if value]
        if ignored:
            return error(a, "--verify compares at the live projection's own sequence; it "
                            f"takes no {', '.join(ignored)}", code=2)
        return await _verify(a)
    if not a.db:
        return error(a, "replay needs --db NEW.sqlite (a new file), or --verify", code=2)
    return await _rebuild(a)


async def _log_reader(a: argparse.Namespace, name: str) -> Client:
    """A connection to the server whose log the command reads, once it is known to
    have one (else the one-line reason: no JetStream, no jetflow there yet)."""
    from jetflow.adapters.bus import connect, require_stream

    nc = await connect(a.nats, name=name)
    try:
        await require_stream(nc.jetstream(), S.EVENTS_STREAM)
    except BaseException:
        await nc.close()
        raise
    return nc


async def _rebuild(a: argparse.Namespace) -> int:
    from jetflow.cli.progress import progress_reporter
    from jetflow.projections.fetcher import FetchError
    from jetflow.projections.replay import rebuild
    from jetflow.projections.store import check_replaceable, remove_db

    path = Path(a.db)
    if path.exists() and not a.force:
        return error(a, f"{path} exists; replay builds a new file (--force replaces it)")
    check_replaceable(path)  # a projection no projector is writing, nothing else
    nc = await _log_reader(a, "jetflow-replay")
    remove_db(path)
    terminated: list[int] = []
    try:
        with progress_reporter("replay") as report, _terminate_cancels(terminated):
            result = await rebuild(nc, path, to_seq=a.to_seq, until=a.until,
                                   batch=a.batch, progress=report)
    except FetchError as exc:
        return error(a, f"{exc}; {path} was not written")
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
    from jetflow.cli.progress import progress_reporter
    from jetflow.projections.fetcher import FetchError
    from jetflow.projections.verify import verify

    live = await projection_path(a)
    assert live is not None
    nc = await _log_reader(a, "jetflow-verify")
    try:
        with tempfile.TemporaryDirectory(prefix="jetflow-verify-") as tmp, \
                progress_reporter("verify") as report:
            result = await verify(nc, live, Path(tmp), batch=a.batch, progress=report)
    except FetchError as exc:
        return error(a, f"{exc}; nothing was verified", code=2)
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
    from jetflow.cli.progress import progress_reporter
    from jetflow.projections.export import export_parquet

    nc = await _log_reader(a, "jetflow-export")
    try:
        with progress_reporter("export") as report:
            result = await export_parquet(nc, Path(a.parquet), from_seq=a.from_seq,
                                          progress=report)
    finally:
        await nc.close()
    if a.json:
        print(json.dumps({"dir": a.parquet, "events": result.events,
                          "last_seq": result.last_seq, "files": result.files,
                          "seconds": round(result.seconds, 3)}))
        return 0
    if not result.events:
        print(f"nothing to export: the stream holds no message at or after seq {a.from_seq}",
              file=sys.stderr)
        return 0
    print(f"exported {result.events} events (up to seq {result.last_seq}) to {a.parquet} "
          f"in {result.files} file(s), {result.seconds:.1f}s")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "replay", help="rebuild a projection from the stream (time travel), or --verify",
        description="Rebuild a projection from sequence 1 into a new file, up to the head, "
                    "--to-seq or --until (time travel: then `jetflow status --db FILE`). "
                    "The file is built as FILE.partial and appears only when complete. "
                    "--verify compares a rebuild with the live projection instead.")
    common_options(p)
    projection_options(p, "the file to build (required); with --verify, the live "
                           "projection (default <data>/projections.sqlite)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--to-seq", type=positive_int, metavar="N", help="stop after sequence N")
    bound.add_argument("--until", type=unix_time, metavar="TIME",
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
    common_options(p)
    p.add_argument("--parquet", required=True, metavar="DIR", help="output directory")
    p.add_argument("--from-seq", type=positive_int, default=1, metavar="N",
                   help="start at sequence N (1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_export)
