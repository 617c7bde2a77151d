"""``jetflow export --parquet DIR``: the event log as Parquet, partitioned by day and type.

Hive-style directories (``DIR/day=2026-11-22/type=succeeded/part-<seq>-0.parquet``), one
row per stored message, so pandas, Polars and DuckDB read it as one table::

    duckdb -c "SELECT type, count(*) FROM read_parquet('DIR/**/*.parquet',
               hive_partitioning=true) GROUP BY type"

``day`` is the UTC day the server stored the message (``stored_at``), which grows with
the sequence; ``at`` is the event's own time. Messages that are not valid events are kept
too, with the reason in ``error``. File names carry the first sequence of their chunk,
so exporting the same range again replaces files instead of duplicating rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as ds

from core import subjects as S
from core.codec import CodecError, decode_event
from core.metadata import Stored
from core.natsclient import Client
from projections.reader import StreamReader
from projections.replay import Progress, stream_head

__all__ = ["SCHEMA", "ExportResult", "export_parquet", "rows_of"]

SCHEMA = pa.schema([
    ("seq", pa.int64()),
    ("stored_at", pa.timestamp("us", tz="UTC")),
    ("subject", pa.string()),
    ("kind", pa.string()),
    ("entity_id", pa.string()),
    ("v", pa.int32()),
    ("at", pa.float64()),
    ("data", pa.string()),
    ("correlation_id", pa.string()),
    ("traceparent", pa.string()),
    ("error", pa.string()),
    ("day", pa.string()),
    ("type", pa.string()),
])
_PARTITIONING = ds.partitioning(pa.schema([("day", pa.string()), ("type", pa.string())]),
                                flavor="hive")


@dataclass(frozen=True, slots=True)
class ExportResult:
    events: int
    files: int
    last_seq: int
    seconds: float


def rows_of(msgs: list[Stored]) -> dict[str, list[Any]]:
    """Column lists (in :data:`SCHEMA` order) for a batch of stored messages."""
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for msg in msgs:
        for name, value in _row(msg).items():
            columns[name].append(value)
    return columns


def _row(msg: Stored) -> dict[str, Any]:
    parts = msg.subject.split(".")
    row: dict[str, Any] = {
        "seq": msg.seq, "stored_at": msg.time_ns // 1000,
        "subject": msg.subject, "kind": parts[1] if len(parts) > 1 else None,
        "entity_id": parts[2] if len(parts) > 2 else None, "v": None, "at": None,
        "data": None, "correlation_id": msg.header(S.HDR_CORRELATION_ID),
        "traceparent": msg.header(S.HDR_TRACEPARENT), "error": None,
        "day": datetime.fromtimestamp(msg.time_ns / 1e9, UTC).strftime("%Y-%m-%d"),
        "type": _type_of(parts)}
    try:
        event = decode_event(msg.subject, msg.data, msg.seq)
    except CodecError as exc:
        row["error"] = f"{exc.code}: {exc.message}"
        row["data"] = msg.data[:4096].decode("utf-8", "replace")
        return row
    row.update(v=event.v, at=event.at, data=_json(event.data))
    return row


def _type_of(parts: list[str]) -> str:
    """The partition of a message: its event type, or ``_invalid`` for odd subjects."""
    name = parts[3] if len(parts) == 4 else ""
    return name if name and name.replace("_", "").isalnum() else "_invalid"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def export_parquet(nc: Client, out_dir: Path, *, from_seq: int = 1,
                         chunk: int = 100_000, progress: Progress | None = None
                         ) -> ExportResult:
    """Write the log from ``from_seq`` up to the head as it is now into ``out_dir``."""
    head = await stream_head(nc)
    started = time.perf_counter()
    events = files = last = 0
    if head >= from_seq:
        reader = StreamReader(nc, S.EVENTS_STREAM, start_seq=from_seq, batch=5000, idle_s=0.5)
        pending: list[Stored] = []
        try:
            async for msgs in reader.batches():
                pending += [m for m in msgs if m.seq <= head]
                end = reader.next_seq > head or (not msgs and reader.caught_up)
                if len(pending) >= chunk or (end and pending):
                    files += _write(out_dir, pending)
                    events += len(pending)
                    last = pending[-1].seq
                    pending = []
                if progress:
                    progress(reader.next_seq - 1, head, events + len(pending))
                if end:
                    break
        finally:
            await reader.close()
    return ExportResult(events, files, last, time.perf_counter() - started)


def _write(out_dir: Path, msgs: list[Stored]) -> int:
    table = pa.Table.from_pydict(rows_of(msgs), schema=SCHEMA)
    first = msgs[0].seq
    written: list[str] = []
    ds.write_dataset(table, out_dir, format="parquet", partitioning=_PARTITIONING,
                     basename_template=f"part-{first:012d}-{{i}}.parquet",
                     existing_data_behavior="overwrite_or_ignore",
                     file_visitor=lambda f: written.append(f.path))
    return len(written)
