"""``jetflow replay --verify``: is the live projection what the log says it should be?

A consistent snapshot of the live file (SQLite's backup API, while the projector keeps
writing) fixes the sequence to compare at; a rebuild from the stream up to that sequence
goes into a second file; the two are compared table by table, row by row."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from jetflow.projections.replay import Progress, rebuild
from jetflow.projections.schema import TABLES
from jetflow.projections.store import open_reader, read_only_uri

__all__ = ["RowDiff", "TableDiff", "VerifyResult", "snapshot", "compare", "verify"]

_SAMPLE = 1000  # rows fetched per table and side to describe differences


@dataclass(frozen=True, slots=True)
class RowDiff:
    key: dict[str, Any]
    live: dict[str, Any] | None  # None: the row is missing from the live projection
    rebuilt: dict[str, Any] | None  # None: the rebuild has no such row

    def describe(self) -> str:
        key = ", ".join(f"{k}={v!r}" for k, v in self.key.items())
        if self.live is None:
            return f"{key}: missing from the live projection"
        if self.rebuilt is None:
            return f"{key}: in the live projection but not in the rebuild"
        changed = [f"{c}: live={self.live[c]!r} rebuilt={self.rebuilt[c]!r}"
                   for c in self.live if self.live[c] != self.rebuilt[c]]
        return f"{key}: " + "; ".join(changed)


@dataclass
class TableDiff:
    table: str
    only_live: int = 0
    only_rebuilt: int = 0
    rows: list[RowDiff] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_live or self.only_rebuilt)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    seq: int
    tables: list[TableDiff]

    @property
    def ok(self) -> bool:
        return all(t.equal for t in self.tables)


def snapshot(live: Path, dest: Path) -> int:
    """Copy ``live`` to ``dest`` as of one instant; return its checkpoint sequence."""
    with contextlib.closing(sqlite3.connect(read_only_uri(live), uri=True)) as src, \
            contextlib.closing(sqlite3.connect(dest)) as dst:
        src.backup(dst)
        row = dst.execute("SELECT last_seq FROM checkpoint WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def compare(live: Path, rebuilt: Path, *, limit: int = 20) -> list[TableDiff]:
    """Table by table, the rows that are not the same in both files."""
    with contextlib.closing(sqlite3.connect(read_only_uri(live), uri=True)) as db:
        db.execute("ATTACH DATABASE ? AS rebuilt", (read_only_uri(rebuilt),))
        return [_compare_table(db, table, keys, limit) for table, keys in TABLES.items()]


def _compare_table(db: sqlite3.Connection, table: str, keys: tuple[str, ...],
                   limit: int) -> TableDiff:
    columns = [r[1] for r in db.execute(f"PRAGMA main.table_info({table})")]
    live_sql = f"SELECT * FROM main.{table} EXCEPT SELECT * FROM rebuilt.{table}"
    rebuilt_sql = f"SELECT * FROM rebuilt.{table} EXCEPT SELECT * FROM main.{table}"
    diff = TableDiff(table, _count(db, live_sql), _count(db, rebuilt_sql))
    if diff.equal:
        return diff
    live_rows = _keyed(db, live_sql, columns, keys)
    rebuilt_rows = _keyed(db, rebuilt_sql, columns, keys)
    for key in sorted(live_rows.keys() | rebuilt_rows.keys(), key=repr)[:limit]:
        diff.rows.append(RowDiff(dict(zip(keys, key, strict=True)), live_rows.get(key),
                                 rebuilt_rows.get(key)))
    return diff


def _count(db: sqlite3.Connection, sql: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0])


def _keyed(db: sqlite3.Connection, sql: str, columns: list[str], keys: tuple[str, ...]
           ) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = (dict(zip(columns, r, strict=True)) for r in db.execute(f"{sql} LIMIT {_SAMPLE}"))
    return {tuple(r[k] for k in keys): r for r in rows}


async def verify(nc: NATS, live: Path, workdir: Path, *, batch: int = 5000,
                 progress: Progress | None = None) -> VerifyResult:
    """Rebuild into ``workdir`` up to the live projection's sequence and compare."""
    await (await open_reader(live)).close()  # the same clear errors as the read commands
    copy, fresh = workdir / "live-snapshot.sqlite", workdir / "rebuilt.sqlite"
    seq = await asyncio.to_thread(snapshot, live, copy)
    await rebuild(nc, fresh, to_seq=seq, batch=batch, progress=progress)
    return VerifyResult(seq, await asyncio.to_thread(compare, copy, fresh))
