"""Running a plugin in the handler child: load its source (its sha256 checked before every
load), call ``parse``, and write each output as Parquet, streamed batch by batch (memory
stays bounded by a batch), under its schema contract.

For an output ``OUTPUTS`` declares, each batch is cast to the declared columns; rows that
break the contract (a null in a non-nullable column, a value that does not cast) go to
``<output>_quarantine`` with a ``_jf_reason`` column instead; beyond ``max_quarantine`` of
the rows the attempt fails, permanently. Every written row carries ``_jf_job_id`` and
``_jf_plugin_version``. A file is written as ``.<job>-<attempt>.parquet.tmp``, fsynced and
renamed to ``<job_id>-<attempt>.parquet``: nothing partial is ever under a final name, and
a failed attempt removes what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jetflow.core.plugin import PluginError, read_plugin
from jetflow.workers import plugin_hooks as hooks
from jetflow.workers.context import PermanentError

__all__ = ["Output", "PluginContext", "run_plugin"]

log = logging.getLogger("jetflow.plugin")
ROW_GROUP = 128 * 1024  # rows per Parquet row group
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
    """Run the plugin ``spec`` names on its input; the outputs it wrote."""
    module, outputs = _load(spec)
    spec = {**spec, "outputs": outputs}
    source = spec["input"]
    if not os.path.isfile(source) or not os.access(source, os.R_OK):
        raise PermanentError(f"input {source} is missing or unreadable")
    out_dir = Path(spec["output"])
    ctx = PluginContext(job_id, attempt, args, source, str(out_dir))
    parse = module.parse
    writers: list[_Writer] = []
    try:
        produced = parse(source, ctx) if _takes_ctx(parse) else parse(source)
        for name, data in _outputs(produced, spec):
            writer = _Writer(out_dir / name, name, job_id, attempt, spec,
                             (spec.get("outputs") or {}).get(name))
            writers.append(writer)
            for batch in _batches(data, name):
                writer.write(batch)
        results = []
        for w in writers:
            results += w.finish()
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        for w in writers:
            w.discard()
        raise PermanentError(f"{source} cannot be read as this plugin expects: "
                             f"{type(exc).__name__}: {exc}") from None
    except BaseException:
        for w in writers:
            w.discard()
        raise
    return {"outputs": results, "plugin": spec["name"], "version": spec["version"]}


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
        yield from data.to_batches(max_chunksize=ROW_GROUP)
    elif isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
        for i, item in enumerate(data):
            if isinstance(item, pa.Table):
                yield from item.to_batches(max_chunksize=ROW_GROUP)
            elif isinstance(item, pa.RecordBatch):
                yield item
            else:
                raise PermanentError(f"output {name}: item {i} is a {type(item).__name__}, "
                                     "not a RecordBatch or Table")
    else:
        raise PermanentError(f"output {name}: parse returned a {type(data).__name__}; it "
                             "returns a Table, a RecordBatch, an iterator of RecordBatches "
                             "or a list of Output(name, data)")


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
        if self.first is None:
            self.first = batch.schema
        elif not batch.schema.equals(self.first):
            raise PermanentError(f"output {self.name}: batch {self.batches} has schema "
                                 f"({_schema_text(batch.schema)}), the first had "
                                 f"({_schema_text(self.first)})")
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


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


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
