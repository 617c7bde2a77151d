"""The worker's side of a plugin job: the Arrow IPC streams its child sends, one per
output, written as Parquet under the output's schema contract.

The child runs ``parse`` and writes each output's record batches to a FIFO as an Arrow IPC
stream (rows are never pickled, and the pipe's back-pressure keeps both processes' memory
bounded by a few batches). A thread of the worker reads the stream and writes it: for an
output ``OUTPUTS`` declares, each batch is cast to the declared columns; rows that break
the contract (a null in a non-nullable column, a value that does not cast) go to
``<output>_quarantine`` with a ``_jf_reason`` column instead; beyond ``max_quarantine`` of
the rows the attempt fails, permanently. Every written row carries ``_jf_job_id`` and
``_jf_plugin_version``. A file is written as ``.<job>-<attempt>.parquet.tmp``, fsynced and
renamed to ``<job_id>-<attempt>.parquet`` once the attempt succeeded: nothing partial is
ever under a final name, and a failed, timed-out or cancelled attempt removes what it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jetflow.workers.context import PermanentError

__all__ = ["Receiver", "ROW_GROUP"]

ROW_GROUP = 128 * 1024  # rows per Parquet row group
READ_BUFFER = 1 << 20  # bytes read from the FIFO at a time
UNSTICK_S = 0.1  # how often a discard lets go a thread waiting for its stream


class Receiver:
    """The outputs of one plugin attempt: a thread per output stream announced by the
    child (an ``output`` frame: its name and FIFO), then :meth:`finish` or :meth:`discard`.
    """

    def __init__(self, spec: dict[str, Any], job_id: str, attempt: int) -> None:
        self.spec, self.job_id, self.attempt = spec, job_id, attempt
        self.out_dir = Path(spec["output"])
        self._writers: list[_Writer] = []
        self._reading: list[asyncio.Future[None]] = []
        self._fifos: list[str] = []
        self._stopped = threading.Event()

    def on_output(self, frame: dict[str, Any]) -> None:
        """The child is about to stream output ``frame["name"]`` into ``frame["path"]``."""
        name, path = str(frame["name"]), str(frame["path"])
        contract = (self.spec.get("outputs") or {}).get(name)
        if any(w.name == name for w in self._writers):
            raise PermanentError(f"parse returned output {name!r} twice")
        writer = _Writer(self.out_dir / name, name, self.job_id, self.attempt, self.spec,
                         contract)
        self._writers.append(writer)
        self._fifos.append(path)
        loop = asyncio.get_running_loop()
        self._reading.append(loop.run_in_executor(None, self._read, writer, path))

    def _read(self, writer: _Writer, path: str) -> None:
        """In a thread: the stream, batch by batch, into ``writer``. Closing the FIFO early
        (on an error) stops the child with a broken pipe."""
        with open(path, "rb", buffering=READ_BUFFER) as src:  # once the child opened it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if self._stopped.is_set():
                return
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                return  # nothing came: the child stopped before its first batch
            for batch in reader:
                if self._stopped.is_set():
                    return
                writer.write(batch)

    async def finish(self) -> list[dict[str, Any]]:
        """Once the child said it succeeded: every stream read to its end, the contracts'
        quarantine shares checked, the files renamed into place; what was written. Raises
        PermanentError (what the worker found wrong), the files removed."""
        try:
            await asyncio.gather(*self._reading)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._close_all)
        except BaseException:
            await self.discard()
            raise

    async def failure(self) -> PermanentError | None:
        """What went wrong on the worker's side, if anything (once the child ended)."""
        results = await asyncio.gather(*self._reading, return_exceptions=True)
        for result in results:
            if isinstance(result, PermanentError):
                return result
            if isinstance(result, pa.ArrowException):
                return PermanentError(f"writing an output: {type(result).__name__}: {result}")
        return None

    def _close_all(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for writer in self._writers:
            results += writer.finish()
        return results

    async def discard(self) -> None:
        """Stop reading and remove everything this attempt wrote."""
        self._stopped.set()
        while not all(f.done() for f in self._reading):
            # a thread still waiting for its writer (a child killed before it opened the
            # FIFO): opening the other end lets it go
            for path in self._fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            await asyncio.wait(self._reading, timeout=UNSTICK_S)
        await asyncio.gather(*self._reading, return_exceptions=True)
        for path in self._fifos:  # one its child made and died before it was read
            with contextlib.suppress(OSError):
                os.unlink(path)
        for writer in self._writers:
            writer.discard()


class _File:
    """One Parquet file being written: a temporary name until :meth:`close` renames it."""

    def __init__(self, directory: Path, job_id: str, attempt: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.final = directory / f"{job_id}-{attempt}.parquet"
        self.tmp = directory / f".{job_id}-{attempt}.parquet.tmp"
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.schema: pa.Schema | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=ROW_GROUP)
        self.rows += table.num_rows

    def close(self) -> dict[str, Any] | None:
        if self.writer is None:
            return None
        self.writer.close()
        with open(self.tmp, "rb+") as tmp:
            os.fsync(tmp.fileno())
        os.replace(self.tmp, self.final)
        dir_fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        digest = hashlib.sha256()
        with open(self.final, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        assert self.schema is not None
        return {"uri": self.final.resolve().as_uri(), "rows": self.rows,
                "bytes": self.final.stat().st_size, "sha256": digest.hexdigest(),
                "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable}
                           for f in self.schema]}

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):  # removed anyway
                self.writer.close()
        for p in (self.tmp, self.final):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class _Writer:
    """One output: its batches checked against the contract, written with lineage."""

    def __init__(self, directory: Path, name: str, job_id: str, attempt: int,
                 spec: dict[str, Any], contract: list[dict[str, Any]] | None) -> None:
        self.name, self.job_id, self.version = name, job_id, str(spec["version"])
        self.contract = contract
        self.max_quarantine = float(spec.get("max_quarantine", 0.1))
        self.main = _File(directory, job_id, attempt)
        self.quarantine = _File(directory.with_name(f"{name}_quarantine"), job_id, attempt)
        self.first: pa.Schema | None = None
        self.seen = 0
        self.batches = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self.first is None:  # (one stream, one schema: the child checks each batch)
            self.first = batch.schema
        self.batches += 1
        self.seen += batch.num_rows
        table = pa.Table.from_batches([batch])
        if self.contract is not None:
            table, bad = _check(table, self.contract, self.name)
            if bad is not None and bad.num_rows:
                self.quarantine.write(self._lineage(bad))
        if table.num_rows:
            self.main.write(self._lineage(table))

    def _lineage(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        table = table.append_column("_jf_job_id", pa.repeat(self.job_id, n))
        return table.append_column("_jf_plugin_version", pa.repeat(self.version, n))

    def finish(self) -> list[dict[str, Any]]:
        quarantined = self.quarantine.rows
        if self.seen and quarantined / self.seen > self.max_quarantine:
            raise PermanentError(f"output {self.name}: {quarantined} of {self.seen} rows "
                                 f"broke its contract, over the {self.max_quarantine:.0%} "
                                 "allowed (see the reasons in a dry run)")
        out = []
        main = self.main.close()
        if main is None and self.first is not None:  # every row quarantined, or none came
            main = {"uri": None, "rows": 0, "bytes": 0, "sha256": None, "schema": []}
        if main is not None:
            out.append({"name": self.name, **main, "quarantined": quarantined})
        q = self.quarantine.close()
        if q is not None:
            out.append({"name": f"{self.name}_quarantine", **q, "quarantined": 0})
        return out

    def discard(self) -> None:
        self.main.discard()
        self.quarantine.discard()


def _check(table: pa.Table, contract: list[dict[str, Any]], name: str
           ) -> tuple[pa.Table, pa.Table | None]:
    """The rows that keep the contract, cast to it; the others with their reason. The
    checks are Arrow kernels over the whole batch: a row is looked at one by one only
    when its batch has a value that does not cast."""
    missing = [c["name"] for c in contract if c["name"] not in table.column_names]
    if missing:
        raise PermanentError(f"output {name}: no column(s) {missing} that OUTPUTS declares "
                             f"(it has {table.column_names})")
    cast: dict[str, pa.Array] = {}
    problems: list[tuple[str, pa.Array]] = []  # (reason template, mask of rows it covers)
    for col in contract:
        cast[col["name"]] = _cast_column(table, col, problems)
    schema = pa.schema([pa.field(c["name"], cast[c["name"]].type, c["nullable"])
                        for c in contract])
    good = pa.Table.from_arrays([cast[c["name"]] for c in contract], schema=schema)
    if not problems:
        return good, None
    bad_mask = problems[0][1]
    for _, mask in problems[1:]:
        bad_mask = pc.or_(bad_mask, mask)
    bad_idx = pc.indices_nonzero(bad_mask).to_pylist()
    reasons = {}
    for kind, mask in problems:  # the first problem of a row is its reason
        for i in pc.indices_nonzero(mask).to_pylist():
            if i not in reasons:
                reasons[i] = _reason(kind, table, i)
    bad = pa.table({c["name"]: pc.cast(table.column(c["name"]).take(bad_idx), pa.string())
                    for c in contract})
    bad = bad.append_column("_jf_reason", pa.array([reasons[i] for i in bad_idx]))
    return good.filter(pc.invert(bad_mask)), bad


def _cast_column(table: pa.Table, col: dict[str, Any],
                 problems: list[tuple[str, pa.Array]]) -> pa.Array:
    """The column cast to its declared type; the rows that break it added to
    ``problems``."""
    arr = table.column(col["name"]).combine_chunks()
    target = pa.type_for_alias(col["type"]) if "(" not in col["type"] else \
        pa.decimal128(38, 9)
    try:
        values = pc.cast(arr, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values, bad = _cast_each(arr, target)
        mask = [False] * len(arr)
        for i in bad:
            mask[i] = True
        problems.append((f"cast:{col['name']}:{col['type']}", pa.array(mask)))
    if not col["nullable"]:
        nulls = pc.is_null(values)
        if pc.any(nulls).as_py():
            problems.append((f"null:{col['name']}", nulls))
    return values


def _reason(kind: str, table: pa.Table, i: int) -> str:
    what, column, *type_ = kind.split(":", 2)
    if what == "null":
        return f"{column}: null in a non-nullable column"
    return f"{column}: {table.column(column)[i].as_py()!r} is not {type_[0]}"


def _cast_each(arr: pa.Array, target: pa.DataType) -> tuple[pa.Array, list[int]]:
    """Cast value by value (a column whose whole cast failed): nulls where it cannot."""
    out: list[Any] = []
    bad: list[int] = []
    for i, value in enumerate(arr):
        try:
            out.append(pc.cast(pa.array([value.as_py()], arr.type), target)[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            out.append(None)
            bad.append(i)
    return pa.array(out, target), bad
