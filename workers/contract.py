"""An output's schema contract (its ``OUTPUTS`` entry), applied batch by batch in the
plugin's child: the rows that keep it, cast to the declared types, and the rows that break
it (a null in a non-nullable column, a value that does not cast) with their reason.

The checks are Arrow kernels over the whole batch: a row is looked at one by one only
when its batch has a value that does not cast. The worker, which writes the Parquet, only
verifies that what the child streams has the contract's schema (see
:func:`conforms`): the per-row work runs in the child, beside the worker's writing.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from jetflow.workers.context import PermanentError

__all__ = ["REASON", "check", "conforms", "quarantine_schema", "schema_of"]

REASON = "_jf_reason"  # the quarantine's column saying why a row is there


def schema_of(contract: list[dict[str, Any]]) -> pa.Schema:
    """The Arrow schema a contract declares."""
    return pa.schema([pa.field(c["name"], _type(c["type"]), c["nullable"]) for c in contract])


def quarantine_schema(contract: list[dict[str, Any]]) -> pa.Schema:
    """The quarantine's columns: the declared ones as text (what did not cast), and why."""
    return pa.schema([*(pa.field(c["name"], pa.string()) for c in contract),
                      pa.field(REASON, pa.string())])


def conforms(batch: pa.RecordBatch, schema: pa.Schema) -> str | None:
    """What is wrong with ``batch`` for an output of ``schema``, if anything (no row is
    read: the schema, and the null counts of the non-nullable columns)."""
    if not batch.schema.equals(schema):
        return (f"has schema ({_text(batch.schema)}), its contract declares "
                f"({_text(schema)})")
    for i, f in enumerate(schema):
        if not f.nullable and batch.column(i).null_count:
            return f"has nulls in non-nullable column {f.name}"
    return None


def check(batch: pa.RecordBatch, contract: list[dict[str, Any]], name: str
          ) -> tuple[pa.RecordBatch, pa.RecordBatch | None]:
    """The rows of ``batch`` that keep the contract, cast to it; the others with their
    reason (None when there are none)."""
    missing = [c["name"] for c in contract if c["name"] not in batch.schema.names]
    if missing:
        raise PermanentError(f"output {name}: no column(s) {missing} that OUTPUTS declares "
                             f"(it has {batch.schema.names})")
    problems: list[tuple[str, pa.Array]] = []  # (reason template, mask of rows it covers)
    cast = [_cast_column(batch, col, problems) for col in contract]
    good = pa.RecordBatch.from_arrays(cast, schema=schema_of(contract))
    if not problems:
        return good, None
    bad_mask = problems[0][1]
    for _, mask in problems[1:]:
        bad_mask = pc.or_(bad_mask, mask)
    bad_idx = pc.indices_nonzero(bad_mask).to_pylist()
    reasons: dict[int, str] = {}
    for kind, mask in problems:  # the first problem of a row is its reason
        for i in pc.indices_nonzero(mask).to_pylist():
            if i not in reasons:
                reasons[i] = _reason(kind, batch, i)
    columns = [pc.cast(batch.column(c["name"]).take(bad_idx), pa.string()) for c in contract]
    bad = pa.RecordBatch.from_arrays(
        [*columns, pa.array([reasons[i] for i in bad_idx], pa.string())],
        schema=quarantine_schema(contract))
    return good.filter(pc.invert(bad_mask)), bad


def _type(alias: str) -> pa.DataType:
    return pa.type_for_alias(alias) if "(" not in alias else pa.decimal128(38, 9)


def _cast_column(batch: pa.RecordBatch, col: dict[str, Any],
                 problems: list[tuple[str, pa.Array]]) -> pa.Array:
    """The column cast to its declared type; the rows that break it added to
    ``problems``."""
    arr = batch.column(col["name"])
    target = _type(col["type"])
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


def _reason(kind: str, batch: pa.RecordBatch, i: int) -> str:
    what, column, *type_ = kind.split(":", 2)
    if what == "null":
        return f"{column}: null in a non-nullable column"
    return f"{column}: {batch.column(column)[i].as_py()!r} is not {type_[0]}"


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


def _text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" + ("" if f.nullable else " not null")
                     for f in schema)
