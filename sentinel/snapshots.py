"""Storing and loading the sentinel's snapshot (:mod:`jetflow.core.snapshot`) in the
``JF_SNAPSHOTS`` object store, so that a restarted sentinel folds only the events after
it: ready in seconds with millions of events in the log.

A snapshot is used only if the log still holds what it covers: the message at its
``last_seq`` has the digest it recorded (or, aged out by the log's retention, the stream
is the one it was taken of); anything else (another server, a log deleted and made
anew) and the sentinel folds the whole log instead, as it always could.
"""

from __future__ import annotations

import logging
import time

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from jetflow.adapters.bus import event_at
from jetflow.adapters.natsclient import Client
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, dumps, loads
from jetflow.core.fleet import Fleet
from jetflow.core.retry import RetryPolicy
from jetflow.core.snapshot import SnapshotError, restore, take, tip_digest
from jetflow.core.snapshot import due as snapshot_due

__all__ = ["Snapshots"]

log = logging.getLogger("jetflow.sentinel")



class Snapshots:
    def __init__(self, nc: Client, *, policy: RetryPolicy,
                 queue_policies: dict[str, RetryPolicy], lease_s: float) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.policy, self.queue_policies, self.lease_s = policy, queue_policies, lease_s
        self.saved_seq = 0
        self.saved_at = time.monotonic()
        self._store: ObjectStore | None = None

    async def load(self) -> Fleet | None:
        """The fleet of the stored snapshot, if it covers this log; else None."""
        try:
            found = await (await self._bucket()).get(S.SENTINEL_SNAPSHOT)
        except nats.js.errors.NotFoundError:
            return None
        try:
            doc = loads(found.data or b"")
            why = await self._unusable(doc)
            if why is None:
                fleet = restore(doc, policy=self.policy, queue_policies=self.queue_policies,
                                lease_s=self.lease_s)
                self.saved_seq = fleet.last_seq
                log.info("restored from the snapshot at seq %d (%d jobs, %d workers): folding "
                         "the log from seq %d", fleet.last_seq, len(fleet.jobs),
                         len(fleet.workers), fleet.last_seq + 1)
                return fleet
        except (CodecError, SnapshotError, TypeError, KeyError) as exc:
            why = str(exc)
        log.warning("not using the stored snapshot (%s): folding the whole log", why)
        return None

    async def _unusable(self, doc: dict[str, object]) -> str | None:
        """Why the snapshot does not cover this log, or None if it does."""
        info = await self.js.stream_info(S.EVENTS_STREAM)
        last = int(str(doc["last_seq"]))
        if last > info.state.last_seq:
            return f"it covers seq {last}, the log ends at {info.state.last_seq}"
        if last >= info.state.first_seq and last > 0:
            stored = await event_at(self.nc, last)
            if stored is None or tip_digest(stored[1], stored[2]) != doc["tip"]:
                return f"the log's message at seq {last} is not the one it covers"
        elif doc["stream_created"] != _created(info):
            return "it was taken of another JF_EVENTS stream"
        return None

    def due(self, fleet: Fleet) -> bool:
        return snapshot_due(fleet.last_seq - self.saved_seq, len(fleet.jobs),
                            time.monotonic() - self.saved_at)

    async def save(self, fleet: Fleet) -> None:
        """Store what the fleet knows now, when that is the log up to ``fleet.last_seq``
        (else nothing: the next try is in a few seconds). The document is taken at once:
        the fleet moves on while the tip is read."""
        if not fleet.covers_prefix():
            return
        doc = take(fleet, tip="", stream_created="")
        seq = int(doc["last_seq"])
        stored = await event_at(self.nc, seq) if seq else None
        if seq and stored is None:
            return  # that message is gone already: nothing to pin the snapshot to
        info = await self.js.stream_info(S.EVENTS_STREAM)
        doc["tip"] = tip_digest(stored[1], stored[2]) if stored else ""
        doc["stream_created"] = _created(info)
        data = dumps(doc)
        await (await self._bucket()).put(S.SENTINEL_SNAPSHOT, data)
        self.saved_seq, self.saved_at = seq, time.monotonic()
        log.info("snapshot at seq %d stored (%d jobs, %d bytes)", seq, len(doc["jobs"]),
                 len(data))

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(S.SNAPSHOT_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._store = await self.js.create_object_store(S.SNAPSHOT_BUCKET)
        return self._store


def _created(info: object) -> str:
    created = getattr(info, "created", None)
    return created.isoformat() if created is not None else ""
