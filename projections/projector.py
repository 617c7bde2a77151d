"""The projector: JF_EVENTS -> SQLite, exactly once.

Each batch is applied in one transaction together with the checkpoint (the last stream
sequence it contains), so a crash at any moment leaves the file at a batch boundary and
the projector resumes right after it: nothing is applied twice or skipped. A file of an
older schema version is deleted on start and rebuilt from the stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from nats.aio.msg import Msg

from jetflow.adapters.auth import local_origin
from jetflow.adapters.bus import FIRST_CONNECT_WAIT_S, connect, ensure_streams
from jetflow.adapters.reader import StreamReader
from jetflow.adapters.runtime import cancel_and_wait, supervise
from jetflow.core import subjects as S
from jetflow.core.codec import dumps
from jetflow.projections.applier import Applier
from jetflow.projections.store import Store

__all__ = ["Projector"]

log = logging.getLogger("jetflow.projector")


class Projector:
    def __init__(self, url: str | None, db_path: Path, *, batch: int = 2000,
                 idle_s: float = 1.0, linger_s: float = 0.005, commit_every_s: float = 0.1,
                 wait_nats_s: float = FIRST_CONNECT_WAIT_S) -> None:
        self.url = url
        self.wait_nats_s = wait_nats_s
        self.db_path = Path(db_path)
        self.batch = batch
        self.idle_s = idle_s
        self.linger_s = linger_s
        # At most one transaction this often while events keep coming: a commit costs
        # about as much as applying a few hundred events, so a busy log is projected in
        # batches of hundreds (the view lags by this much at most).
        self.commit_every_s = commit_every_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Projector:
        # the file first: one it cannot write fails now, not after waiting for NATS
        self.store = Store.open(self.db_path)
        self.store.mark_snapshot(False)  # a replay's file a projector takes on is live now
        try:
            self.nc = await connect(self.url, name="jetflow-projector",
                                    wait_s=self.wait_nats_s)
            await ensure_streams(self.nc.jetstream())
            await self.nc.subscribe(S.PROJECTOR_WHERE, cb=self._on_where)
        except BaseException:  # cancelled (a stop signal) or failed: leave nothing open
            await self.stop()
            raise
        self._task = asyncio.create_task(supervise("projector", self._run))
        return self

    async def stop(self) -> None:
        await cancel_and_wait([self._task] if self._task else [])
        nc = getattr(self, "nc", None)  # None when stopped while it was connecting
        if nc is not None:
            await nc.close()
        self.store.close()

    async def __aenter__(self) -> Projector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def checkpoint(self) -> int:
        return self.store.checkpoint()[0]

    def where(self) -> dict[str, object]:
        """Where this projector keeps its file: what read commands run from another
        directory ask for (``jf.ctl.projector.where``)."""
        return {"db": str(self.db_path.resolve()), "host": socket.gethostname(),
                "pid": os.getpid(), "seq": self.store.checkpoint()[0]}

    async def _on_where(self, msg: Msg) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, dumps(self.where()))

    async def _run(self) -> None:
        applier = Applier(self.store, origin=local_origin())
        reader = StreamReader(self.nc, S.EVENTS_STREAM, start_seq=applier.last_seq + 1,
                              batch=self.batch, idle_s=self.idle_s, linger_s=self.linger_s)
        log.info("projecting from seq %d into %s", reader.next_seq, self.db_path)
        loop = asyncio.get_running_loop()
        try:
            async for msgs in reader.batches():
                if not msgs:
                    continue
                started = loop.time()
                applier.apply(msgs)
                if len(msgs) < self.batch:  # more may come: let them gather a while
                    await asyncio.sleep(self.commit_every_s - (loop.time() - started))
        finally:
            await reader.close()
