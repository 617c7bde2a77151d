"""Rebuilding a projection from the log: from sequence 1 up to the head, a sequence or a
time (time travel), with the same :class:`Applier` as the live projector. The log is read
by a child process (:mod:`jetflow.projections.fetcher`) while this one folds and writes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client

from jetflow.adapters.auth import local_origin
from jetflow.core import subjects as S
from jetflow.projections.applier import Applier
from jetflow.projections.fetcher import Bounds, FetchError, fetch
from jetflow.projections.store import Store, check_replaceable, remove_db

__all__ = ["ReplayResult", "Progress", "rebuild", "Bounds"]

# (last sequence read, the sequence it stops at, events applied so far)
Progress = Callable[[int, int, int], None]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    events: int
    last_seq: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def stream_head(nc: Client) -> int:
    info = await nc.jetstream().stream_info(S.EVENTS_STREAM)
    return int(info.state.last_seq)


async def rebuild(nc: Client, db_path: Path, *, to_seq: int | None = None,
                  until: float | None = None, batch: int = 5000,
                  progress: Progress | None = None) -> ReplayResult:
    """Apply the log from sequence 1 into ``db_path`` up to the head as it is now,
    ``to_seq``, or the last event stored at or before ``until`` (Unix s).

    The file is built as ``<db_path>.partial`` and renamed to ``db_path`` (replacing it)
    only when complete: a failed or interrupted replay leaves no half-built file that a
    read command would take for the system as it was."""
    head = await stream_head(nc)
    bounds = Bounds(min(head, to_seq) if to_seq is not None else head,
                    None if until is None else int(until * 1e9))
    partial = db_path.with_name(db_path.name + ".partial")
    check_replaceable(partial)  # another replay into the same file is building it now
    remove_db(partial)
    store = Store.open(partial, bulk=True)
    started = time.perf_counter()
    complete = False
    try:
        applier = Applier(store, origin=local_origin())
        events = await _replay(nc, applier, bounds, batch, progress)
        last = applier.last_seq
        store.mark_snapshot(True)
        store.finish()
        complete = True
    finally:
        store.close()
        if not complete:
            remove_db(partial)
    remove_db(db_path)
    partial.replace(db_path)
    remove_db(partial)  # an empty -wal or -shm left by the checkpoint, if any
    return ReplayResult(events, last, time.perf_counter() - started)


async def _replay(nc: Client, applier: Applier, bounds: Bounds, batch: int,
                  progress: Progress | None) -> int:
    if bounds.to_seq <= applier.last_seq:
        return 0
    events = 0
    batches = fetch(url_of(nc), applier.last_seq + 1, bounds, batch=batch)
    async with contextlib.aclosing(batches):  # a failed apply stops the reading child now
        async for msgs in batches:
            applier.apply(msgs)
            events += len(msgs)
            if progress:
                progress(applier.last_seq, bounds.to_seq, events)
    return events


def url_of(nc: Client) -> str:
    """The URL ``nc`` is connected with (credentials included), for a child process."""
    uri = nc.connected_url
    if uri is None:
        raise FetchError("not connected to NATS")
    return uri.geturl()
