"""A reader's origin check: which of a job's stored worker events the worker they name did
not sign (:mod:`jetflow.core.origin`), judged by the Ed25519 key that worker announced in
its ``joined`` event, read by direct gets. It needs no secret, so a submitter's
``client.status`` and ``client.wait`` are not fooled by another worker's forgery."""

from __future__ import annotations

from collections.abc import Iterable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from jetflow.adapters.bus import last_event_on
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event
from jetflow.core.events import Event
from jetflow.core.origin import ED_HEADER, WORKER_SIGNED, verify

__all__ = ["AnnouncedKeys"]


class AnnouncedKeys:
    """The keys workers announced, read once per worker id."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._keys: dict[str, str | None] = {}

    async def unsigned(self, stored: Iterable[tuple[Event, Msg]]) -> set[int]:
        """The stream sequences of the worker events in ``stored`` that the worker they
        name announced a key for and did not sign with it."""
        out: set[int] = set()
        for event, msg in stored:
            worker = event.data.get("worker")
            if event.kind != "job" or event.type not in WORKER_SIGNED or \
                    not isinstance(worker, str):
                continue
            key = await self.key_of(worker)
            if key is not None and not verify(key, msg.subject, msg.data,
                                              (msg.headers or {}).get(ED_HEADER)):
                out.add(event.seq)
        return out

    async def key_of(self, worker_id: str) -> str | None:
        """The key worker ``worker_id`` announced in its latest ``joined``, or None (a
        worker of an unsecured system, an unknown worker, a malformed id)."""
        if worker_id not in self._keys:
            self._keys[worker_id] = await self._read(worker_id)
        return self._keys[worker_id]

    async def _read(self, worker_id: str) -> str | None:
        try:
            subject = S.worker_subject(S.check_token(worker_id, "worker id"), "joined")
        except ValueError:
            return None
        found = await last_event_on(self.nc, subject)
        if found is None:
            return None
        try:
            key = decode_event(found[1], found[2], found[0]).data.get("key")
        except CodecError:
            return None
        return key if isinstance(key, str) else None
