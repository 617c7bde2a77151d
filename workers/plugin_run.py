"""Running a plugin in the handler child: load its source (its sha256 checked before every
load), call ``parse``, and stream each output's record batches to the worker as Arrow IPC.

An output goes through a FIFO the child makes in the worker's IPC directory (``spec
["ipc"]``): an ``output`` frame names it to the worker, whose thread reads it and writes
the Parquet (see :mod:`jetflow.workers.outputs`); the pipe's back-pressure bounds memory on
both sides. An output with a contract is checked and cast here, batch by batch (while the
worker writes the previous ones), its quarantined rows sent through a second FIFO.
Outputs are streamed one after another; a batch whose schema is not the output's first one
fails the attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import logging
import os
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pyarrow as pa

from jetflow.core.plugin import PluginError, read_plugin
from jetflow.workers import plugin_hooks as hooks
from jetflow.workers.context import PermanentError
from jetflow.workers.contract import check

__all__ = ["Output", "PluginContext", "run_plugin"]

log = logging.getLogger("jetflow.plugin")
BATCH_ROWS = 128 * 1024  # rows per batch a Table is streamed in
PROGRESS_EVERY_S = 0.25  # at most this often does ctx.progress reach the worker


class Output(NamedTuple):
    """One named output of a plugin: a Table, a RecordBatch or an iterator of batches."""

    name: str
    data: Any


@dataclass
class PluginContext:
    """What ``parse(path, ctx)`` receives."""

    job_id: str
    attempt: int
    args: dict[str, Any]
    input: str
    output: str
    logger: logging.Logger = field(default_factory=lambda: log)
    _last: float = 0.0

    def progress(self, done: float, total: float | None = None) -> None:
        """Say how far the job is: ``progress`` events in its history (a few a second at
        most; the last one, ``done == total``, always)."""
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_S and done != total:
            return
        self._last = now
        if hooks.send_progress is not None:
            hooks.send_progress(done, total)
        else:
            print(f"progress {done}" + (f"/{total}" if total is not None else ""))

    def cancelled(self) -> bool:
        """A cancelled attempt's process is stopped by its worker: never true here."""
        return False


def run_plugin(spec: dict[str, Any], args: dict[str, Any], job_id: str,
               attempt: int) -> dict[str, Any]:
    """Run the plugin ``spec`` names on its input, its outputs streamed to the worker
    (which puts what it wrote in the result)."""
    module, outputs = _load(spec)
    spec = {**spec, "outputs": outputs}
    source = spec["input"]
    if not os.path.isfile(source) or not os.access(source, os.R_OK):
        raise PermanentError(f"input {source} is missing or unreadable")
    ctx = PluginContext(job_id, attempt, args, source, str(spec["output"]))
    parse = module.parse
    names: list[str] = []
    try:
        produced = parse(source, ctx) if _takes_ctx(parse) else parse(source)
        for n, (name, data) in enumerate(_outputs(produced, spec)):
            fifo = Path(spec["ipc"]) / f"{job_id}-{attempt}-{n}.arrow"
            if _stream(fifo, name, data, (spec["outputs"] or {}).get(name)):
                names.append(name)
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{source} cannot be read as this plugin expects: "
                             f"{type(exc).__name__}: {exc}") from None
    return {"outputs": names, "plugin": spec["name"], "version": spec["version"]}


def _stream(fifo: Path, name: str, data: Any,
            contract: list[dict[str, Any]] | None = None) -> bool:
    """Output ``name``'s batches to the worker through ``fifo``, an Arrow IPC stream (with
    a contract: the rows cast to it, and the rows that break it through a second stream,
    opened at the first such row); False when it has none."""
    batches = _batches(data, name)
    first = next(batches, None)
    if first is None:
        return False
    main = _Sink(fifo, {"name": name})
    quarantine = _Sink(fifo.with_suffix(".quarantine.arrow"),
                       {"name": f"{name}_quarantine", "quarantine_of": name})
    try:
        for i, batch in enumerate(itertools.chain([first], batches)):
            if i and not batch.schema.equals(first.schema):
                raise PermanentError(f"output {name}: batch {i} has schema "
                                     f"({_schema_text(batch.schema)}), the first had "
                                     f"({_schema_text(first.schema)})")
            if contract is None:
                main.write(batch)
                continue
            good, bad = check(batch, contract, name)
            main.write(good)
            if bad is not None:
                quarantine.write(bad)
        main.close()
        quarantine.close()
    finally:
        main.abandon()
        quarantine.abandon()
    return True


class _Sink:
    """One Arrow IPC stream to the worker, its FIFO made and announced (an ``output``
    frame) at the first batch."""

    def __init__(self, fifo: Path, frame: dict[str, Any]) -> None:
        self.fifo, self.frame = fifo, frame
        self.file: BinaryIO | None = None
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            if hooks.send_frame is None:
                raise RuntimeError("a plugin runs in a worker's child process")
            os.mkfifo(self.fifo, 0o600)
            hooks.send_frame({"t": "output", **self.frame, "path": str(self.fifo)})
            self.file = open(self.fifo, "wb")  # noqa: SIM115 - blocks until the worker reads
            self.writer = pa.ipc.new_stream(self.file, batch.schema)
        self.writer.write_batch(batch)

    def close(self) -> None:
        """The stream's end: the worker has it all."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abandon(self) -> None:
        """Let go of the FIFO (after :meth:`close`, or cut short on an error)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _load(spec: dict[str, Any]) -> tuple[types.ModuleType, dict[str, Any] | None]:
    """The plugin's module, and its OUTPUTS (normalised), from source whose sha256 is
    the one the job pinned."""
    path = Path(spec["path"])
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != spec["sha256"]:
        raise PermanentError(f"plugin {spec['name']} {spec['version']}: {path} does not have "
                             f"sha256 {spec['sha256'][:12]}: refused")
    try:
        meta = read_plugin(source, str(path))
    except PluginError as exc:
        raise PermanentError(str(exc)) from None
    module = types.ModuleType(f"jetflow_plugin_{spec['name']}")
    module.__file__ = str(path)
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the plugin
    except BaseException as exc:  # noqa: BLE001 - an import error fails the attempt
        raise PermanentError(f"plugin {spec['name']} {spec['version']} failed to import: "
                             f"{type(exc).__name__}: {exc}") from None
    if not callable(getattr(module, "parse", None)):
        raise PermanentError(f"plugin {spec['name']} defines no parse()")
    return module, meta.outputs


def _takes_ctx(parse: Any) -> bool:
    try:
        return len(inspect.signature(parse).parameters) >= 2
    except (TypeError, ValueError):
        return False


def _outputs(produced: Any, spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(output name, its data) for what ``parse`` returned."""
    if isinstance(produced, list) and produced and all(
            isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) for o in produced):
        names = [o[0] for o in produced]
        if len(set(names)) < len(names):
            raise PermanentError(f"parse returned output names twice: {names}")
        yield from ((str(n), d) for n, d in produced)
        return
    declared = list(spec.get("outputs") or {})
    yield (declared[0] if len(declared) == 1 else "output"), produced


def _batches(data: Any, name: str) -> Iterator[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        yield from data.to_batches(max_chunksize=BATCH_ROWS)
    elif isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
        for i, item in enumerate(data):
            if isinstance(item, pa.Table):
                yield from item.to_batches(max_chunksize=BATCH_ROWS)
            elif isinstance(item, pa.RecordBatch):
                yield item
            else:
                raise PermanentError(f"output {name}: item {i} is a {type(item).__name__}, "
                                     "not a RecordBatch or Table")
    else:
        raise PermanentError(f"output {name}: parse returned a {type(data).__name__}; it "
                             "returns a Table, a RecordBatch, an iterator of RecordBatches "
                             "or a list of Output(name, data)")
