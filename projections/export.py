"""``jetflow export --parquet DIR``: the event log as Parquet, partitioned by day and type.

Hive-style directories (``DIR/day=2026-11-22/type=succeeded/part-<seq>-<id>-0.parquet``),
one row per stored message, so pandas, Polars and DuckDB read it as one table::

    duckdb -c "SELECT type, count(*) FROM read_parquet('DIR/**/*.parquet',
               hive_partitioning=true) GROUP BY type"

``day`` is the UTC day the server stored the message (``stored_at``), which grows with
the sequence; ``at`` is the event's own time. Messages that are not valid events are kept
too, with the reason in ``error``. File names carry the first sequence of their chunk and
the id of the export that wrote them, so an export never overwrites another's file.

DIR holds each sequence once, whatever was exported into it before. An export writes
``--from-seq`` up to the head into a hidden directory inside DIR (``.export-partial-<id>``,
files ending in ``.staged``, so that no ``*.parquet`` glob reads them), moves those files
in next to the files that were there, and only then takes the sequences it wrote out of
each earlier file holding any (rewritten through a hidden ``.tmp`` file and a rename, or
deleted when no row is left): a re-export of the same range, a superset or an overlapping
tail replaces those rows, and rows it does not write (before ``--from-seq``, or of
messages no longer in the stream) are kept. An export reads and changes only what it
names itself (``day=*/type=*/part-*.parquet``, its hidden directories and ``.tmp`` files,
partition directories it leaves empty); anything else in DIR is left alone.

Nothing is taken out before everything new is in, and on disk (files and directories
synced), so an export that fails or is killed at any point, or the machine losing power,
loses no row. One that stops while reading the stream or staging leaves the
Parquet files in DIR as they were; one that stops while moving files in or rewriting or
deleting earlier ones may leave sequences twice, and running the same export again leaves
each once (but a sequence deleted from the stream in between stays twice: it is not
exported again). What a killed export leaves (the hidden directory, ``.tmp`` files) is
removed by the next one. DIR is checked first (created if missing, refused if it is not a
writable directory or holds an unreadable ``part-*.parquet``) and locked, so two exports
into it cannot run at once. Failures raise :class:`ExportError`, which ``jetflow`` prints
as one line.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import functools
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from jetflow.adapters.natsclient import Client
from jetflow.adapters.reader import StreamReader
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event, dumps
from jetflow.core.metadata import Stored
from jetflow.projections.replay import Progress, stream_head
from jetflow.projections.schema import ProjectionError

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
_STAGED = ".staged"  # staged files: Parquet, but no "*.parquet" glob (DuckDB) sees them
_TMP = ".tmp"  # a file being rewritten: hidden, and not "*.parquet" either
_PARTS = "day=*/type=*"  # where an export writes; no other file in DIR is touched

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
    return dumps(value).decode()


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


# -- the sequences an export wrote -----------------------------------------------------------

class _Runs:
    """A set of sequences as sorted, disjoint runs ``[lo, hi]``: an export's sequences are
    contiguous but for messages deleted from the stream, so this stays small (16 bytes a
    run, not 8 a sequence) and an earlier file is filtered with a few range masks."""

    __slots__ = ("his", "los")

    def __init__(self) -> None:
        self.los: array[int] = array("q")
        self.his: array[int] = array("q")

    def __bool__(self) -> bool:
        return bool(self.los)

    def add(self, seq: int) -> None:
        """Add the next sequence; they come in stream order (a guard checks it)."""
        if self.his and seq <= self.his[-1]:
            raise ExportError(f"the stream was read out of order ({seq} after "
                              f"{self.his[-1]}); nothing was changed, export again")
        if self.his and seq == self.his[-1] + 1:
            self.his[-1] = seq
        else:
            self.los.append(seq)
            self.his.append(seq)

    def _between(self, lo: int, hi: int) -> range:
        """The indices of the runs that meet ``[lo, hi]``."""
        return range(bisect.bisect_left(self.his, lo), bisect.bisect_right(self.los, hi))

    def overlaps(self, lo: int, hi: int) -> bool:
        return len(self._between(lo, hi)) > 0

    def mask(self, seq: Any) -> Any | None:
        """A boolean mask of the values of the Arrow array ``seq`` that are in a run (nulls
        are not), or None when none can be: only the runs between its min and max count."""
        bounds = pc.min_max(seq).as_py()
        if bounds["min"] is None:
            return None
        lo, hi = bounds["min"], bounds["max"]
        runs = self._between(lo, hi)
        if not runs:
            return None
        if len(runs) <= _FEW_RUNS:
            hit = functools.reduce(pc.or_, (
                pc.and_(pc.greater_equal(seq, self.los[k]), pc.less_equal(seq, self.his[k]))
                for k in runs))
        else:  # many small gaps: the sequences between min and max, at most max - min + 1
            values = pa.concat_arrays([
                pa.array(range(max(self.los[k], lo), min(self.his[k], hi) + 1), pa.int64())
                for k in runs])
            hit = pc.is_in(seq, value_set=values)
        return pc.fill_null(hit, False)


_FEW_RUNS = 16


# -- reading the stream into the staging directory -------------------------------------------

@dataclass(slots=True)
class _Staged:
    dir: Path
    events: int = 0
    files: int = 0
    last: int = 0
    runs: _Runs = field(default_factory=_Runs)

    def write(self, msgs: list[Stored]) -> None:
        self.files += _write(self.dir, msgs)
        self.events += len(msgs)
        self.last = msgs[-1].seq
        for msg in msgs:
            self.runs.add(msg.seq)

    def seqs(self) -> _Runs:
        return self.runs


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


def _write(staging: Path, msgs: list[Stored]) -> int:
    """Write a chunk into the staging directory as ``*.staged`` files (Parquet, named so
    that no ``*.parquet`` glob over DIR reads them); returns how many."""
    table = pa.Table.from_pydict(rows_of(msgs), schema=SCHEMA)
    name = f"part-{msgs[0].seq:012d}-{staging.name.removeprefix(_STAGING)}-{{i}}{_STAGED}"
    written: list[str] = []
    try:
        ds.write_dataset(table, staging, format="parquet", partitioning=_PARTITIONING,
                         basename_template=name, existing_data_behavior="overwrite_or_ignore",
                         file_visitor=lambda f: written.append(f.path))
    except OSError as exc:
        raise ExportError(f"cannot write the export into {staging.parent}: {_why(exc)}; "
                          "the files already there were left as they were") from None
    return len(written)


# -- the output directory --------------------------------------------------------------------

@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[Path]:
    """Make sure ``out_dir`` is a writable directory, lock it for this export, remove what
    a killed export left and yield an empty staging directory inside it (its name is the
    export's id), removed at the end whatever happens."""
    fd = _open_dir(out_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export is writing into {out_dir}; wait for it to "
                              "finish or choose another directory") from None
        except OSError as exc:
            raise ExportError(f"cannot lock {out_dir}: {_why(exc)}; export into a directory "
                              "on a file system that supports locks") from None
        _remove_leftovers(out_dir)
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


def _remove_leftovers(out_dir: Path) -> None:
    """What a killed export left: its staging directory, a half-written rewrite (the file
    it was rewriting is still whole)."""
    for stale in out_dir.glob(f"{_STAGING}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in out_dir.glob(f"{_PARTS}/.part-*{_TMP}"):
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    """The files of earlier exports in ``out_dir`` (``day=*/type=*/part-*.parquet``; no
    other file is read or changed) and the sequences each holds (None: unknown, read the
    file to find out); refuses before anything is written if one cannot be read."""
    index: dict[Path, SeqRange | None] = {}
    for path in sorted(out_dir.glob(f"{_PARTS}/part-*.parquet")):
        try:
            index[path] = _seq_range(pq.read_metadata(path))
        except (OSError, pa.ArrowException) as exc:
            raise ExportError(f"{path} is not a readable Parquet file ({exc}); move it "
                              "out of the way or export into another directory") from None
    return index


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
            seqs: _Runs) -> None:
    """Move every staged file into ``out_dir`` under a name no other file has, then take
    the sequences they hold out of the files that were there (``existing``): nothing is
    removed before all of it is in, so stopping anywhere can leave a row twice (gone when
    the same export runs again), never lose one."""
    if not seqs:
        return
    try:
        moved: list[Path] = []
        for staged in sorted(staging.glob(f"{_PARTS}/part-*{_STAGED}")):
            _fsync(staged)
            moved.append(out_dir / staged.relative_to(staging).with_suffix(".parquet"))
            _move_in(staged, moved[-1])
        _fsync_dirs({path.parent for path in moved}, out_dir)  # all in, on disk: only now
        for path, held in existing.items():
            if held is None or seqs.overlaps(*held):
                _remove_rows(path, seqs, out_dir)
    except (OSError, pa.ArrowException) as exc:
        raise ExportError(f"replacing the earlier export in {out_dir} failed: {exc}; run "
                          "the same export again to complete it") from None


def _move_in(staged: Path, dest: Path) -> None:
    """Rename a staged file to its place, never over another file (its name carries this
    export's id, so none can be there: the check is a guard)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        raise FileExistsError(errno.EEXIST, "a file is in the way", str(dest))
    os.replace(staged, dest)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(dirs: set[Path], out_dir: Path) -> None:
    """Sync ``dirs`` and every directory between them and ``out_dir`` (which holds the
    entries of partition directories just made), each once."""
    chain: set[Path] = set()
    for d in dirs:
        while d != out_dir and d not in chain:
            chain.add(d)
            d = d.parent
    for d in sorted(chain, key=lambda d: -len(d.parts)):
        _fsync(d)
    _fsync(out_dir)


def _remove_rows(path: Path, seqs: _Runs, out_dir: Path) -> None:
    """Rewrite a file of an earlier export without ``seqs``; delete it (and the partition
    directories left empty) when no row is left."""
    table = pq.read_table(path, partitioning=None)
    hit = seqs.mask(table["seq"]) if "seq" in table.column_names else None
    if hit is None or not pc.any(hit).as_py():
        return
    rest = table.filter(pc.invert(hit))
    if rest.num_rows:
        _write_table(rest, path)
        return
    path.unlink()
    parent = path.parent
    while parent != out_dir and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _write_table(table: pa.Table, path: Path) -> None:
    """Write ``path`` whole or not at all (a hidden temporary file, synced, then a rename)."""
    tmp = path.with_name(f".{path.name}{_TMP}")
    try:
        pq.write_table(table, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
