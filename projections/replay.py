"""Rebuilding a projection from the log: from sequence 1 up to the head, a sequence or a
time (time travel), with the same :class:`Applier` as the live projector."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from core import subjects as S
from core.metadata import parse_ack_reply
from projections.applier import Applier, raw_of
from projections.reader import StreamReader
from projections.store import Store
from projections.views import Raw

__all__ = ["ReplayResult", "Progress", "rebuild", "Bounds"]

# (last sequence read, the sequence it stops at, events applied so far)
Progress = Callable[[int, int, int], None]


@dataclass(frozen=True, slots=True)
class Bounds:
    """Where a replay stops: the stream head when it started, or earlier."""

    to_seq: int
    until_ns: int | None = None  # the stream's store time, in Unix nanoseconds

    def cut(self, msgs: list[Msg]) -> tuple[list[Raw], bool]:
        """The messages within bounds, and whether the end was reached."""
        raws: list[Raw] = []
        for msg in msgs:
            delivery = parse_ack_reply(msg.reply)
            if delivery.stream_seq > self.to_seq or (
                    self.until_ns is not None and delivery.timestamp_ns > self.until_ns):
                return raws, True
            raws.append(raw_of(msg, delivery.stream_seq))
        return raws, bool(raws) and raws[-1].seq >= self.to_seq


@dataclass(frozen=True, slots=True)
class ReplayResult:
    events: int
    last_seq: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def stream_head(nc: NATS) -> int:
    info = await nc.jetstream().stream_info(S.EVENTS_STREAM)
    return int(info.state.last_seq)


async def rebuild(nc: NATS, db_path: Path, *, to_seq: int | None = None,
                  until: float | None = None, batch: int = 5000,
                  progress: Progress | None = None) -> ReplayResult:
    """Apply the log from sequence 1 into ``db_path`` (a new or empty file) up to the head
    as it is now, ``to_seq``, or the last event stored at or before ``until`` (Unix s)."""
    head = await stream_head(nc)
    bounds = Bounds(min(head, to_seq) if to_seq is not None else head,
                    None if until is None else int(until * 1e9))
    store = Store.open(db_path)
    started = time.perf_counter()
    try:
        applier = Applier(store)
        events = await _replay(nc, applier, bounds, batch, progress)
        last = applier.last_seq
    finally:
        store.close()
    return ReplayResult(events, last, time.perf_counter() - started)


async def _replay(nc: NATS, applier: Applier, bounds: Bounds, batch: int,
                  progress: Progress | None) -> int:
    if bounds.to_seq <= applier.last_seq:
        return 0
    reader = StreamReader(nc, S.EVENTS_STREAM, start_seq=applier.last_seq + 1, batch=batch,
                          idle_s=0.5)
    events = 0
    try:
        async for msgs in reader.batches():
            raws, done = bounds.cut(msgs)
            applier.apply(raws)
            events += len(raws)
            if progress:
                progress(applier.last_seq, bounds.to_seq, events)
            if done or (not msgs and reader.caught_up):
                break
    finally:
        await reader.close()
    return events
