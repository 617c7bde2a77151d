"""The read commands of the projection: ``status`` (the queue view), ``workers`` (with
live heartbeats), ``jobs`` and ``errors``. Human tables by default, ``--json`` for
machines and ``--watch`` to refresh; they read ``--db`` (default
``<data>/projections.sqlite``) and say clearly what to do when it is missing or from
another schema version."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite
import nats.errors
from rich.console import RenderableType
from rich.live import Live

from jetflow.adapters.bus import BusError, default_url
from jetflow.cli.options import positive_int, read_options
from jetflow.cli.projection import projection_path
from jetflow.projections.queries import STATE_ORDER

__all__ = ["add_commands"]

Producer = Callable[[aiosqlite.Connection], Awaitable[tuple[Any, RenderableType]]]

async def _show(a: argparse.Namespace, produce: Producer) -> int:
    """Print once, or again every ``--watch`` seconds until Ctrl-C."""
    from jetflow.cli.tables import console
    from jetflow.projections.store import open_reader

    path = await projection_path(a)
    assert path is not None
    db = await open_reader(path)
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
    from jetflow.cli.tables import status_view
    from jetflow.projections.queries import queue_view

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        view = await queue_view(db, minutes=a.minutes)
        return view, status_view(view)

    return await _show(a, produce)


async def cmd_workers(a: argparse.Namespace) -> int:
    from jetflow.cli.tables import workers_view
    from jetflow.projections.queries import as_of, worker_view

    beats = _Heartbeats(None if a.no_heartbeats else a.nats or default_url())

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
        from jetflow.projections.heartbeats import read_heartbeats
        from jetflow.projections.queries import worker_status

        if self.url is None:
            return
        try:
            if self.nc is None:
                from jetflow.adapters.bus import connect

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
    from jetflow.cli.tables import jobs_view
    from jetflow.projections.queries import as_of, list_jobs

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        jobs = await list_jobs(db, state=a.state, queue=a.queue, handler=a.handler,
                               limit=a.limit)
        position = await as_of(db)
        return {"as_of": position, "jobs": jobs}, jobs_view(jobs, position)

    return await _show(a, produce)


async def cmd_errors(a: argparse.Namespace) -> int:
    from jetflow.cli.tables import errors_view
    from jetflow.projections.queries import as_of, list_errors

    async def produce(db: aiosqlite.Connection) -> tuple[Any, RenderableType]:
        errors, position = await list_errors(db, limit=a.limit), await as_of(db)
        return {"as_of": position, "errors": errors}, errors_view(errors, position)

    return await _show(a, produce)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("status", help="the queue view: jobs by state and priority, oldest "
                                      "queued job, outcomes per minute")
    read_options(p)
    p.add_argument("--minutes", type=positive_int, default=5,
                   help="outcomes per minute over this many minutes (5)")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("workers", help="the worker view, with live heartbeats")
    read_options(p)
    p.add_argument("--no-heartbeats", action="store_true",
                   help="do not read JF_HEARTBEATS (a replay snapshot never shows them)")
    p.set_defaults(run=cmd_workers)

    p = sub.add_parser("jobs", help="list jobs, the most recently changed first")
    read_options(p)
    p.add_argument("--state", choices=STATE_ORDER, metavar="STATE",
                   help=f"one of {', '.join(STATE_ORDER)}")
    p.add_argument("--queue")
    p.add_argument("--handler")
    p.add_argument("--limit", type=positive_int, default=50, help="at most N jobs (50)")
    p.set_defaults(run=cmd_jobs)

    p = sub.add_parser("errors", help="projection errors: messages in the log the projector "
                                      "recorded instead of applying (latest first)")
    read_options(p)
    p.add_argument("--limit", type=positive_int, default=50, help="at most N errors (50)")
    p.set_defaults(run=cmd_errors)

