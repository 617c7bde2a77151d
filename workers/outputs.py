"""The worker's side of a plugin job: the Arrow IPC streams its child sends, written as
Parquet.

The child runs ``parse`` and writes each output's record batches to a FIFO as an Arrow IPC
stream (rows are never pickled, and the pipe's back-pressure keeps both processes' memory
bounded by a few batches). For an output ``OUTPUTS`` declares, the child applies the
contract (:mod:`jetflow.workers.contract`): its stream carries the rows cast to the
declared types, and a second stream, ``<output>_quarantine``, the rows that broke it with a
``_jf_reason`` column. A thread of the worker reads each stream, verifies that a
contract's stream has the contract's schema, and writes it; beyond ``max_quarantine`` of
an output's rows quarantined the attempt fails, permanently. Every written row carries
``_jf_job_id`` and ``_jf_plugin_version`` (dictionary-encoded strings: one value per
file). A file is written as ``.<job>-<attempt>.parquet.tmp``, fsynced and renamed to
``<job_id>-<attempt>.parquet`` once the attempt succeeded: nothing partial is ever under a
final name, and a failed, timed-out or cancelled attempt removes what it wrote.
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
import pyarrow.parquet as pq

from jetflow.workers.context import PermanentError
from jetflow.workers.contract import conforms, quarantine_schema, schema_of

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
        """The child is about to stream output ``frame["name"]`` into ``frame["path"]``
        (with ``quarantine_of``: the rows that output's contract quarantined)."""
        name, path = str(frame["name"]), str(frame["path"])
        if any(w.name == name for w in self._writers):
            raise PermanentError(f"parse returned output {name!r} twice")
        of = frame.get("quarantine_of")
        contracts = self.spec.get("outputs") or {}
        if of is not None:
            if str(of) not in contracts:
                raise PermanentError(f"output {of!r} has no contract to quarantine rows of")
            expected: pa.Schema | None = quarantine_schema(contracts[str(of)])
        else:
            expected = schema_of(contracts[name]) if name in contracts else None
        writer = _Writer(_File(self.out_dir / name, self.job_id, self.attempt), name,
                         self.job_id, str(self.spec["version"]), expected,
                         None if of is None else str(of))
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
        return _results(self._writers, float(self.spec.get("max_quarantine", 0.1)))

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

    def write(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            self.schema = batch.schema
            self.writer = pq.ParquetWriter(self.tmp, batch.schema, compression="zstd")
        self.writer.write_batch(batch, row_group_size=ROW_GROUP)
        self.rows += batch.num_rows

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
    """One stream of an output (its rows, or the rows its contract quarantined), written
    with lineage; a contract's stream is verified to have the contract's schema."""

    def __init__(self, file: _File, name: str, job_id: str, version: str,
                 expected: pa.Schema | None, quarantine_of: str | None = None) -> None:
        self.file, self.name, self.expected = file, name, expected
        self.quarantine_of = quarantine_of
        self.job_id = pa.array([job_id], pa.string())
        self.version = pa.array([version], pa.string())
        self.batches = 0
        self._zeros = pa.array([], pa.int32())
        self._schema: pa.Schema | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.expected is not None and (wrong := conforms(batch, self.expected)):
            raise PermanentError(f"output {self.name}: the plugin's stream {wrong}")
        self.batches += 1
        if batch.num_rows:
            self.file.write(self._lineage(batch))

    def _lineage(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` with ``_jf_job_id`` and ``_jf_plugin_version``: dictionary columns of
        one value (no string copied or hashed per row)."""
        n = batch.num_rows
        if len(self._zeros) < n:
            self._zeros = pa.repeat(pa.scalar(0, pa.int32()), n)
        zeros = self._zeros.slice(0, n)
        job = pa.DictionaryArray.from_arrays(zeros, self.job_id)
        version = pa.DictionaryArray.from_arrays(zeros, self.version)
        if self._schema is None:
            self._schema = pa.schema([*batch.schema, pa.field("_jf_job_id", job.type, False),
                                      pa.field("_jf_plugin_version", version.type, False)])
        return pa.RecordBatch.from_arrays([*batch.columns, job, version], schema=self._schema)

    def discard(self) -> None:
        self.file.discard()


def _results(writers: list[_Writer], max_quarantine: float) -> list[dict[str, Any]]:
    """Each output's files closed and described: its rows, then its quarantine's (more
    than ``max_quarantine`` of its rows quarantined fails the attempt)."""
    quarantines = {w.quarantine_of: w for w in writers if w.quarantine_of is not None}
    out: list[dict[str, Any]] = []
    for w in writers:
        if w.quarantine_of is not None:
            continue
        q = quarantines.get(w.name)
        quarantined = q.file.rows if q is not None else 0
        seen = w.file.rows + quarantined
        if seen and quarantined / seen > max_quarantine:
            raise PermanentError(f"output {w.name}: {quarantined} of {seen} rows broke its "
                                 f"contract, over the {max_quarantine:.0%} allowed (see "
                                 f"their reasons in {w.name}_quarantine)")
        main = w.file.close()
        if main is None and w.batches:  # every row quarantined
            main = {"uri": None, "rows": 0, "bytes": 0, "sha256": None, "schema": []}
        if main is not None:
            out.append({"name": w.name, **main, "quarantined": quarantined})
        if q is not None and (qfile := q.file.close()) is not None:
            out.append({"name": q.name, **qfile, "quarantined": 0})
    return out
