"""``jetflow export --parquet DIR``: the event log as Parquet, partitioned by day and type.

Hive-style directories (``DIR/day=2026-11-22/type=succeeded/part-<seq>-0.parquet``), one
row per stored message, so pandas, Polars and DuckDB read it as one table::

    duckdb -c "SELECT type, count(*) FROM read_parquet('DIR/**/*.parquet',
               hive_partitioning=true) GROUP BY type"

``day`` is the UTC day the server stored the message (``stored_at``), which grows with
the sequence; ``at`` is the event's own time. Messages that are not valid events are kept
too, with the reason in ``error``. File names carry the first sequence of their chunk.

DIR holds each sequence once, whatever was exported into it before. An export writes
``--from-seq`` up to the head into a hidden directory inside DIR (``.export-partial-*``),
then moves those files in and takes the sequences it wrote out of the files that were
there: a re-export of the same range, a superset or an overlapping tail replaces those
rows, and rows it does not write (before ``--from-seq``, or of messages no longer in the
stream) are kept. An export that fails while reading or writing leaves DIR as it was; one
killed while moving files in may leave a sequence twice, until the same export is run
again. DIR is checked first (created if missing, refused if it is not a writable
directory or holds unreadable Parquet files) and locked, so two exports into it cannot
run at once. Failures raise :class:`ExportError`, which ``jetflow`` prints as one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from core import subjects as S
from core.codec import CodecError, decode_event
from core.metadata import Stored
from core.natsclient import Client
from projections.reader import StreamReader
from projections.replay import Progress, stream_head
from projections.schema import ProjectionError

__all__ = ["SCHEMA", "ExportError", "ExportResult", "export_parquet", "rows_of"]

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
_STAGING = ".export-partial-"  # hidden: Arrow, Spark and Hive skip "." and "_" entries

SeqRange = tuple[int, int]


class ExportError(ProjectionError):
    """An export that cannot be done (DIR unusable, a write failed); the message says why
    and what to do (``jetflow export`` prints it as one line, exit 1)."""


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
    """Write the log from ``from_seq`` up to the head as it is now into ``out_dir``,
    replacing the rows of those sequences already there (see the module docstring)."""
    started = time.perf_counter()
    with _locked(out_dir) as staging:
        existing = _index(out_dir)
        staged = await _stage(nc, staging, from_seq=from_seq, chunk=chunk, progress=progress)
        _commit(out_dir, staging, existing, staged.seqs())
    return ExportResult(staged.events, staged.files, staged.last,
                        time.perf_counter() - started)


# -- reading the stream into the staging directory -------------------------------------------

@dataclass(slots=True)
class _Staged:
    dir: Path
    events: int = 0
    files: int = 0
    last: int = 0
    chunks: list[pa.Array] = field(default_factory=list)

    def write(self, msgs: list[Stored]) -> None:
        self.files += _write(self.dir, msgs)
        self.events += len(msgs)
        self.last = msgs[-1].seq
        self.chunks.append(pa.array([m.seq for m in msgs], pa.int64()))

    def seqs(self) -> pa.Array:
        return pa.concat_arrays(self.chunks) if self.chunks else pa.array([], pa.int64())


async def _stage(nc: Client, staging: Path, *, from_seq: int, chunk: int,
                 progress: Progress | None) -> _Staged:
    head = await stream_head(nc)
    staged = _Staged(staging)
    if head < from_seq:
        return staged
    reader = StreamReader(nc, S.EVENTS_STREAM, start_seq=from_seq, batch=5000, idle_s=0.5)
    pending: list[Stored] = []
    try:
        async for msgs in reader.batches():
            pending += [m for m in msgs if m.seq <= head]
            end = reader.next_seq > head or (not msgs and reader.caught_up)
            if len(pending) >= chunk or (end and pending):
                staged.write(pending)
                pending = []
            if progress:
                progress(reader.next_seq - 1, head, staged.events + len(pending))
            if end:
                return staged
    finally:
        await reader.close()
    return staged


def _write(out_dir: Path, msgs: list[Stored]) -> int:
    table = pa.Table.from_pydict(rows_of(msgs), schema=SCHEMA)
    first = msgs[0].seq
    written: list[str] = []
    try:
        ds.write_dataset(table, out_dir, format="parquet", partitioning=_PARTITIONING,
                         basename_template=f"part-{first:012d}-{{i}}.parquet",
                         existing_data_behavior="overwrite_or_ignore",
                         file_visitor=lambda f: written.append(f.path))
    except OSError as exc:
        raise ExportError(f"cannot write the export into {out_dir.parent}: {_why(exc)}; "
                          "the files already there were left as they were") from None
    return len(written)


# -- the output directory --------------------------------------------------------------------

@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[Path]:
    """Make sure ``out_dir`` is a writable directory, lock it for this export and yield
    an empty staging directory inside it, removed at the end whatever happens."""
    fd = _open_dir(out_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export is writing into {out_dir}; wait for it to "
                              "finish or choose another directory") from None
        for stale in out_dir.glob(f"{_STAGING}*"):  # left by an export that was killed
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out_dir))
        except OSError as exc:
            raise ExportError(f"cannot write into {out_dir}: {_why(exc)}") from None
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(fd)  # releases the lock


def _open_dir(out_dir: Path) -> int:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; export into a "
                          "directory (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ExportError(f"cannot create or open the directory {out_dir}: "
                          f"{_why(exc)}") from None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _index(out_dir: Path) -> dict[Path, SeqRange | None]:
    """The Parquet files already in ``out_dir`` and the sequences each holds (None:
    unknown, read the file to find out); refuses before anything is read or written if
    one cannot be read."""
    index: dict[Path, SeqRange | None] = {}
    for path in _parquet_files(out_dir):
        try:
            index[path] = _seq_range(pq.read_metadata(path))
        except (OSError, pa.ArrowException) as exc:
            raise ExportError(f"{path} is not a readable Parquet file ({exc}); move it "
                              "out of the way or export into another directory") from None
    return index


def _parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def _seq_range(meta: Any) -> SeqRange | None:
    names = meta.schema.names
    if "seq" not in names:
        return (0, 0)  # not one of ours: no sequence of the log can be in it
    col = names.index("seq")
    lows, highs = [], []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(col).statistics
        if group.num_rows and (stats is None or not stats.has_min_max):
            return None
        if group.num_rows:
            lows.append(stats.min)
            highs.append(stats.max)
    return (min(lows), max(highs)) if lows else (0, 0)


# -- replacing what was there ----------------------------------------------------------------

def _commit(out_dir: Path, staging: Path, existing: dict[Path, SeqRange | None],
            seqs: pa.Array) -> None:
    """Move the staged files into ``out_dir``, then take the sequences they hold out of
    the files that were there: moving first means a crash can leave a row twice (fixed by
    exporting again), never lose one."""
    if not len(seqs):
        return
    span = (pc.min(seqs).as_py(), pc.max(seqs).as_py())
    try:
        moved = {_move_in(staged, out_dir / staged.relative_to(staging), seqs)
                 for staged in _parquet_files(staging)}
        for path, held in existing.items():
            if path not in moved and (held is None or _overlap(held, span)):
                _remove_rows(path, seqs, out_dir)
    except (OSError, pa.ArrowException) as exc:
        raise ExportError(f"replacing the earlier export in {out_dir} failed: {exc}; run "
                          "the same export again to complete it") from None


def _overlap(a: SeqRange, b: SeqRange) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _move_in(staged: Path, dest: Path, seqs: pa.Array) -> Path:
    """Rename a staged file to its place; a file of an earlier export with that name (the
    same chunk again) is replaced, its rows of sequences not exported now kept aside."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        rest = _without(pq.read_table(dest, partitioning=None), seqs)
        if rest.num_rows:
            _write_table(rest, _free_name(dest))
    os.replace(staged, dest)
    return dest


def _remove_rows(path: Path, seqs: pa.Array, out_dir: Path) -> None:
    """Rewrite a file of an earlier export without ``seqs``; delete it (and the partition
    directories left empty) when no row is left."""
    table = pq.read_table(path, partitioning=None)
    rest = _without(table, seqs)
    if rest.num_rows == table.num_rows:
        return
    if rest.num_rows:
        _write_table(rest, path)
        return
    path.unlink()
    parent = path.parent
    while parent != out_dir and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _without(table: pa.Table, seqs: pa.Array) -> pa.Table:
    if "seq" not in table.column_names:
        return table
    return table.filter(pc.invert(pc.is_in(table["seq"], value_set=seqs)))


def _write_table(table: pa.Table, path: Path) -> None:
    """Write ``path`` whole or not at all (a hidden temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.stem}-kept{n}{path.suffix}")).exists():
        n += 1
    return candidate
