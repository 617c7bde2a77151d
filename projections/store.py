"""The projection file: opening it (WAL), checking its schema, loading the views a batch
touches and writing a batch together with its checkpoint in one transaction.

The writer is a plain ``sqlite3`` connection used from the projector's own thread: a
5,000-event batch blocks the event loop for ~40 ms, and a replay runs at 19.0k events/s
this way against 16.1k with aiosqlite, whose worker thread fights the reader's message
callbacks for the GIL on every row it binds (200k events, this 2-core machine). The read
commands use aiosqlite (:func:`open_reader`)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from jetflow.projections.schema import INDEX_DDL, SCHEMA_VERSION, TABLE_DDL, ProjectionError
from jetflow.projections.views import (
    WORKFLOW_COLUMNS,
    BatchRows,
    JobView,
    WorkerView,
    job_row,
    job_view_from_row,
    worker_row,
    worker_view_from_row,
)

__all__ = ["Store", "open_reader", "file_version", "remove_db", "read_only_uri",
           "check_replaceable"]

log = logging.getLogger("jetflow.projector")

_UPSERT_JOB = """
INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (job_id) DO UPDATE SET
  queue=excluded.queue, handler=excluded.handler, priority=excluded.priority,
  state=excluded.state, attempt=excluded.attempt, max_attempts=excluded.max_attempts,
  worker=excluded.worker, correlation_id=excluded.correlation_id,
  trace_id=excluded.trace_id, submitted_at=excluded.submitted_at,
  queued_at=excluded.queued_at, started_at=excluded.started_at,
  finished_at=excluded.finished_at, result=excluded.result, error=excluded.error,
  last_seq=excluded.last_seq, events=excluded.events, state_json=excluded.state_json,
  workflow_id=excluded.workflow_id, step=excluded.step
"""
_UPSERT_WORKER = "INSERT OR REPLACE INTO workers VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
_ADD_QUEUE_STATE = """INSERT INTO queue_states VALUES (?,?,?)
ON CONFLICT (queue, state) DO UPDATE SET jobs = jobs + excluded.jobs"""
_ADD_QUEUE_DEPTH = """INSERT INTO queue_depth VALUES (?,?,?)
ON CONFLICT (queue, priority) DO UPDATE SET jobs = jobs + excluded.jobs"""
_ADD_THROUGHPUT = """INSERT INTO throughput VALUES (?,?,?,?,?)
ON CONFLICT (queue, minute) DO UPDATE SET succeeded = succeeded + excluded.succeeded,
  failed = failed + excluded.failed, dead_lettered = dead_lettered + excluded.dead_lettered"""
_LOAD_JOBS = """SELECT job_id, trace_id, queued_at, state_json, workflow_id, step FROM jobs
WHERE job_id IN (SELECT value FROM json_each(?))"""


def read_only_uri(path: Path) -> str:
    """An SQLite URI that opens ``path`` read-only (any characters in the path)."""
    return Path(path).resolve().as_uri() + "?mode=ro"


def file_version(path: Path) -> int | None:
    """The schema version recorded in a projection file; None if it has none."""
    try:
        with contextlib.closing(sqlite3.connect(read_only_uri(path), uri=True)) as db:
            row = db.execute("SELECT schema_version FROM checkpoint WHERE id = 1").fetchone()
    except sqlite3.Error:
        return None
    return int(row[0]) if row else None


def remove_db(path: Path) -> None:
    """Delete a projection file and its WAL companions."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            Path(f"{path}{suffix}").unlink()


def check_replaceable(path: Path) -> None:
    """Raise ProjectionError unless ``path`` is absent, or a projection file (or an empty
    one) that no projector is writing: what ``jetflow replay --force`` may delete."""
    path = Path(path)
    if not path.exists():
        return
    _check_writable(path)
    os.close(_lock(path))


def _check_writable(path: Path) -> None:
    """A projection may be written at ``path``: nothing there, an empty file, an empty
    SQLite database or a projection; never a directory, a device or someone's database."""
    if not path.exists():
        return
    if not path.is_file():
        raise ProjectionError(f"{path} is not a regular file: choose another --db")
    if path.stat().st_size == 0 or file_version(path) is not None:
        return
    try:
        with contextlib.closing(sqlite3.connect(read_only_uri(path), uri=True)) as db:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error:
        raise ProjectionError(f"{path} is not an SQLite file: choose another --db") from None
    if tables:
        raise ProjectionError(f"{path} is an SQLite database but not a jetflow projection "
                              "(no checkpoint table): choose another --db")


def _lock(path: Path) -> int:
    """An exclusive lock on the file (flock, apart from SQLite's own locks), held by
    the one process that writes it; its descriptor, to close when done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProjectionError(f"{path} is being written by another process (a running "
                              "`jetflow projector` or `jetflow replay`?): stop it first, or "
                              "choose another --db") from None
    return fd


class Store:
    """The writer's connection to one projection file (the only one: it holds a lock)."""

    def __init__(self, db: sqlite3.Connection, path: Path, lock_fd: int) -> None:
        self.db = db
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: Path, *, rebuild_older: bool = True, bulk: bool = False) -> Store:
        """Open (creating it if needed). A file of an older schema is deleted, to be rebuilt
        from the stream; one of a newer schema is refused.

        ``bulk`` is for a replay into a file of its own: no fsync per transaction and no
        secondary indexes until :meth:`finish` builds them and makes the file durable. A
        replay killed half way leaves a consistent file it can resume (SQLite's WAL
        still makes every transaction atomic); only a power cut could lose its tail."""
        path = Path(path)
        _check_writable(path)
        version = file_version(path) if path.exists() else None
        if version is not None and version > SCHEMA_VERSION:
            raise ProjectionError(f"{path} has projection schema v{version}, newer than this "
                                  f"jetflow's v{SCHEMA_VERSION}: upgrade jetflow, or use "
                                  "another --db")
        if version is not None and version < SCHEMA_VERSION and rebuild_older:
            log.warning("%s has projection schema v%d, this jetflow writes v%d: rebuilding "
                        "it from the stream", path, version, SCHEMA_VERSION)
            remove_db(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as exc:
            raise ProjectionError(f"cannot create {path}: {exc.strerror or exc}") from None
        lock_fd = _lock(path)
        try:
            db = sqlite3.connect(path, isolation_level=None)
            _prepare(db, bulk=bulk)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(db, path, lock_fd)

    def mark_snapshot(self, snapshot: bool) -> None:
        """Say whether the file is a replay's picture of the log at one point (its readers
        then show no live data next to it) or a live projection a projector keeps up.
        Kept in the file header's ``user_version``, outside the tables --verify compares."""
        self.db.execute(f"PRAGMA user_version = {1 if snapshot else 0}")

    def finish(self) -> None:
        """End a bulk load: build the indexes, then write everything to disk."""
        self.db.executescript(INDEX_DDL)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def checkpoint(self) -> tuple[int, float | None]:
        """(last applied stream sequence, latest event time)."""
        row = self.db.execute("SELECT last_seq, last_at FROM checkpoint WHERE id = 1").fetchone()
        return (int(row[0]), row[1]) if row else (0, None)

    def load_jobs(self, job_ids: Iterable[str]) -> dict[str, JobView]:
        ids = orjson.dumps(list(job_ids)).decode()
        rows = self.db.execute(_LOAD_JOBS, (ids,)).fetchall()
        return {r[0]: job_view_from_row(r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def load_workers_all(self) -> dict[str, WorkerView]:
        rows = self.db.execute("SELECT * FROM workers").fetchall()
        return {r[0]: worker_view_from_row(tuple(r)) for r in rows}

    def write(self, rows: BatchRows) -> None:
        """Write one batch and move the checkpoint, in one transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            _insert_timeline(db, rows.timeline)
            for sql, params in _statements(rows):
                if params:
                    db.executemany(sql, params)
            db.execute("UPDATE checkpoint SET last_seq = ?, last_at = ? WHERE id = 1",
                       (rows.last_seq, rows.last_at))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


_TIMELINE_ROW = "(?,?,?,?,?,?)"
_TIMELINE_ROWS = 256  # per statement: 1,536 parameters, far below SQLite's 32,766
_INSERT_TIMELINE = "INSERT INTO timeline VALUES " + ",".join([_TIMELINE_ROW] * _TIMELINE_ROWS)


def _insert_timeline(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """One row per event, so the most written table: 256 rows per statement cost ~20%
    less than ``executemany``'s one step per row (bench/replay.py, 1M events)."""
    full = len(rows) - len(rows) % _TIMELINE_ROWS
    for i in range(0, full, _TIMELINE_ROWS):
        db.execute(_INSERT_TIMELINE, list(chain.from_iterable(rows[i:i + _TIMELINE_ROWS])))
    if full < len(rows):
        db.executemany(f"INSERT INTO timeline VALUES {_TIMELINE_ROW}", rows[full:])


def _statements(rows: BatchRows) -> list[tuple[str, list[tuple[Any, ...]]]]:
    states = [(*k, n) for k, n in rows.queue_states().items()]
    depth = [(*k, n) for k, n in rows.queue_depth().items()]
    return [
        (_UPSERT_JOB, [job_row(v) for v in rows.jobs.values()]),
        ("INSERT INTO projection_errors VALUES (?,?,?,?,?)", rows.errors),
        (_UPSERT_WORKER, [worker_row(w) for w in rows.workers.values()]),
        (_ADD_QUEUE_STATE, states),
        (_ADD_QUEUE_DEPTH, depth),
        (_ADD_THROUGHPUT, [(*k, *c) for k, c in rows.throughput.items()]),
        # a count back at zero leaves no row, whatever the batch boundaries were
        ("DELETE FROM queue_states WHERE jobs = 0", [()] if states else []),
        ("DELETE FROM queue_depth WHERE jobs = 0", [()] if depth else []),
        ("INSERT OR REPLACE INTO workflow_templates VALUES (?,?,?,?,?,?,?,?)",
         rows.templates),
        *_workflow_statements(rows.workflows),
    ]


_INSERT_WORKFLOW = (f"INSERT OR REPLACE INTO workflows ({', '.join(WORKFLOW_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(WORKFLOW_COLUMNS))})")


def _workflow_statements(changes: dict[str, dict[str, Any]]
                         ) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """A workflow started in the batch: its whole row; one that moved: the columns its
    events set (the same result whatever the batch boundaries were)."""
    out: list[tuple[str, list[tuple[Any, ...]]]] = []
    full = [tuple(c[k] for k in WORKFLOW_COLUMNS) for c in changes.values() if "name" in c]
    if full:
        out.append((_INSERT_WORKFLOW, full))
    for workflow_id, cols in changes.items():
        if "name" not in cols:
            keys = sorted(cols)
            out.append((f"UPDATE workflows SET {', '.join(f'{k} = ?' for k in keys)} "
                        "WHERE workflow_id = ?", [(*(cols[k] for k in keys), workflow_id)]))
    return out


def _prepare(db: sqlite3.Connection, *, bulk: bool) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    # with WAL, a process crash loses nothing either way; OFF skips the fsyncs
    db.execute(f"PRAGMA synchronous={'OFF' if bulk else 'NORMAL'}")
    db.execute("PRAGMA cache_size=-65536")  # 64 MiB
    db.executescript(TABLE_DDL if bulk else TABLE_DDL + INDEX_DDL)
    db.execute("INSERT OR IGNORE INTO checkpoint VALUES (1, 0, NULL, ?)", (SCHEMA_VERSION,))


async def open_reader(path: Path) -> aiosqlite.Connection:
    """Open a projection file read-only, or say clearly why it cannot be read."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ProjectionError(f"{path} is not a regular file: choose another --db")
    if not path.exists():
        raise ProjectionError(
            f"no projection at {path}: pass --db FILE, or --data DIR (the directory "
            "`jetflow up` or `jetflow projector` keeps it in), or build one with "
            f"`jetflow replay --db {path}`")
    version = file_version(path)
    if version is None:
        raise ProjectionError(f"{path} is not a jetflow projection (no checkpoint table)")
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise ProjectionError(
            f"{path} has projection schema v{version}, this jetflow reads v{SCHEMA_VERSION}: "
            + ("upgrade jetflow" if newer else
               "the projector rebuilds it when it starts, or run "
               "`jetflow replay --db NEW.sqlite`"))
    return await aiosqlite.connect(read_only_uri(path), uri=True)
