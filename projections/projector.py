"""The projector: JF_EVENTS -> SQLite, exactly once.

Each batch is applied in one transaction together with the checkpoint (the last stream
sequence it contains), so a crash at any moment leaves the file at a batch boundary and
the projector resumes right after it: nothing is applied twice or skipped.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiosqlite

from core import subjects as S
from core.bus import Tail, connect, ensure_streams
from core.events import Event
from core.job import JobState
from core.metadata import parse_ack_reply
from core.runtime import supervise
from projections.schema import DDL, SCHEMA_VERSION
from projections.views import BatchRows, fold_batch, job_row, state_from_json

__all__ = ["Projector", "open_db"]

log = logging.getLogger("jetflow.projector")

_UPSERT_JOB = """INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"""


async def open_db(path: Path) -> aiosqlite.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.executescript(DDL)
    await db.execute("INSERT OR IGNORE INTO checkpoint VALUES (1, 0, ?)", (SCHEMA_VERSION,))
    await db.commit()
    return db


class Projector:
    def __init__(self, url: str | None, db_path: Path, *, batch: int = 1000) -> None:
        self.url = url
        self.db_path = Path(db_path)
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Projector:
        self.db = await open_db(self.db_path)
        self.nc = await connect(self.url, name="jetflow-projector")
        await ensure_streams(self.nc.jetstream())
        self._task = asyncio.create_task(supervise("projector", self._run))
        return self

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.nc.close()
        await self.db.close()

    async def __aenter__(self) -> Projector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def checkpoint(self) -> int:
        async with self.db.execute("SELECT last_seq FROM checkpoint WHERE id = 1") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _run(self) -> None:
        start = await self.checkpoint() + 1
        tail = Tail(self.nc.jetstream(), S.EVENTS_STREAM, start_seq=start, batch=self.batch)
        log.info("projecting from seq %d into %s", start, self.db_path)
        async for msgs in tail.batches():
            if msgs:
                batch = [(parse_ack_reply(m.reply).stream_seq, m.subject, m.data) for m in msgs]
                await self.apply(batch)

    async def apply(self, batch: list[tuple[int, str, bytes]]) -> None:
        """Apply (seq, subject, data) messages past the checkpoint, in one transaction."""
        done = await self.checkpoint()
        batch = [m for m in batch if m[0] > done]
        if not batch:
            return
        states = await self._load_states({m[1].split(".")[2] for m in batch
                                          if m[1].startswith("jf.job.")})
        rows = fold_batch(batch, states.get)
        await self._write(rows)

    async def _load_states(self, job_ids: set[str]) -> dict[str, JobState]:
        out: dict[str, JobState] = {}
        ids = list(job_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT state_json FROM jobs WHERE job_id IN ({marks})"
            async with self.db.execute(sql, chunk) as cur:
                for (text,) in await cur.fetchall():
                    state = state_from_json(text)
                    out[state.job_id] = state
        return out

    async def _write(self, rows: BatchRows) -> None:
        db = self.db
        await db.execute("BEGIN")
        try:
            await db.executemany(_UPSERT_JOB, [job_row(s) for s in rows.jobs.values()])
            await db.executemany("INSERT OR REPLACE INTO timeline VALUES (?,?,?,?,?,?)",
                                 rows.timeline)
            await db.executemany("INSERT OR REPLACE INTO projection_errors VALUES (?,?,?,?)",
                                 rows.errors)
            for event in rows.workers:
                await _write_worker(db, event)
            await db.execute("UPDATE checkpoint SET last_seq = ? WHERE id = 1",
                             (rows.last_seq,))
            await db.commit()
        except BaseException:
            await db.rollback()
            raise


async def _write_worker(db: aiosqlite.Connection, e: Event) -> None:
    if e.type == "joined":
        await db.execute(
            "INSERT OR REPLACE INTO workers VALUES (?,?,?,?,?,?,?,?,?,?)",
            (e.id, e.get("host", ""), e.get("pid", 0), ",".join(e.data["handlers"]),
             ",".join(e.data["queues"]), e.data["concurrency"], "live", e.at, None, e.seq))
    else:
        await db.execute("UPDATE workers SET status = ?, left_at = ?, last_seq = ? "
                         "WHERE worker_id = ?", (e.type, e.at, e.seq, e.id))
