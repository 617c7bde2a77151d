"""The workers' latest heartbeats, read live from JF_HEARTBEATS (one message per worker).

Heartbeats are not in the log, so they are not in the projection (which stays a pure
function of JF_EVENTS); ``jetflow workers`` lays them over the worker view."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from jetflow.adapters.natsclient import Client
from jetflow.adapters.reader import StreamReader
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, loads
from jetflow.core.metadata import Stored

__all__ = ["Heartbeat", "read_heartbeats", "parse_heartbeat"]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    worker_id: str
    at: float
    running: tuple[str, ...] = ()
    free: int | None = None
    draining: bool = False

    def as_json(self, now: float) -> dict[str, Any]:
        return {"at": self.at, "age_s": round(max(0.0, now - self.at), 3),
                "running": list(self.running), "free": self.free, "draining": self.draining}


def parse_heartbeat(subject: str, data: bytes) -> Heartbeat | None:
    """A heartbeat from ``jf.hb.<worker>`` and its JSON body; None if it is not one."""
    worker_id = subject.rsplit(".", 1)[-1]
    try:
        body = loads(data)
    except CodecError:
        return None
    if not isinstance(body, dict) or type(body.get("at")) not in (int, float):
        return None
    running = body.get("running")
    free = body.get("free")
    return Heartbeat(worker_id, float(body["at"]),
                     tuple(str(j) for j in running) if isinstance(running, list) else (),
                     free if type(free) is int else None, body.get("draining") is True)


async def read_heartbeats(nc: Client, *, timeout_s: float = 3.0) -> dict[str, Heartbeat]:
    """The latest heartbeat of every worker that sent one recently."""
    info = await nc.jetstream().stream_info(S.HEARTBEAT_STREAM)
    if not info.state.messages:
        return {}
    reader = StreamReader(nc, S.HEARTBEAT_STREAM, start_seq=info.state.first_seq,
                          batch=1000, idle_s=0.2)
    beats: dict[str, Heartbeat] = {}
    deadline = time.monotonic() + timeout_s
    try:
        async for msgs in reader.batches():
            _collect(beats, msgs)
            if reader.caught_up or time.monotonic() > deadline:
                break
    finally:
        await reader.close()
    return beats


def _collect(beats: dict[str, Heartbeat], msgs: list[Stored]) -> None:
    for msg in msgs:
        beat = parse_heartbeat(msg.subject, msg.data)
        if beat is not None:
            beats[beat.worker_id] = beat
