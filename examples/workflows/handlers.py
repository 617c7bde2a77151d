"""The step handlers of the example workflows (beside this file), named as tasker-core's
test suite names its steps' work, so results can be compared.

A step's handler is an ordinary jetflow handler: ``args`` is ``{"context": <the
workflow's context>, "parents": {<parent step>: <its result>}, "args": <the step's static
args>}``, plus ``"batch": <cursor>`` for a batch worker instance. Results are exact:
integers beyond 64 bits (n^64) come back as Python ints. ``jetflow worker --handlers
@jetflow.examples.workflows.handlers`` serves every one of them (``jetflow up`` does by
default).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jetflow import JobContext, PermanentError

Args = dict[str, Any]


def _context(args: Args) -> dict[str, Any]:
    context = args.get("context")
    return context if isinstance(context, dict) else {}


def _only_parent(args: Args) -> Any:
    parents = args.get("parents") or {}
    if len(parents) != 1:
        raise PermanentError(f"expected one parent result, got {sorted(parents)}")
    return next(iter(parents.values()))


# -- arithmetic: linear, diamond, tree, mixed_dag ---------------------------------------------

def wf_square_number(args: Args, ctx: JobContext) -> int:
    """context.even_number squared (an odd or missing number is refused, permanently)."""
    n = _context(args).get("even_number")
    if type(n) is not int or n % 2:
        raise PermanentError(f"context.even_number must be an even integer, got {n!r}")
    return n * n


def wf_add_ten(args: Args, ctx: JobContext) -> int:
    return int(_only_parent(args)) + 10


def wf_times_three(args: Args, ctx: JobContext) -> int:
    return int(_only_parent(args)) * 3


def wf_halve(args: Args, ctx: JobContext) -> int | float:
    value: int | float = _only_parent(args)
    return value // 2 if value % 2 == 0 else value / 2


def wf_square_parent(args: Args, ctx: JobContext) -> int:
    value = int(_only_parent(args))
    return value * value


def wf_square_product(args: Args, ctx: JobContext) -> int:
    """The square of the product of every parent's result."""
    parents = args.get("parents") or {}
    if not parents:
        raise PermanentError("no parent results to multiply")
    product = math.prod(int(v) for v in parents.values())
    return product * product


# -- conditional_approval ------------------------------------------------------------------------

SMALL, LARGE = 1000, 5000


def _amount(args: Args) -> float:
    amount = _context(args).get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
        raise PermanentError(f"context.amount must be a number above 0, got {amount!r}")
    return amount


def wf_validate_request(args: Args, ctx: JobContext) -> dict[str, Any]:
    context = _context(args)
    return {"valid": True, "amount": _amount(args), "requester": context.get("requester")}


def wf_routing_decision(args: Args, ctx: JobContext) -> dict[str, Any]:
    amount = _amount(args)
    if amount < SMALL:
        route, branches = "auto", ["auto_approve"]
    elif amount < LARGE:
        route, branches = "manager_only", ["manager_approval"]
    else:
        route, branches = "dual", ["manager_approval", "finance_review"]
    return {"branches": branches, "route_type": route, "amount": amount}


def wf_approve(args: Args, ctx: JobContext) -> dict[str, Any]:
    kind = (args.get("args") or {}).get("approval_type", "manual")
    return {"approved": True, "approval_type": kind, "amount": _amount(args)}


_PATHS = {("automatic",): "auto", ("manager",): "manager_only", ("finance", "manager"): "dual"}


def wf_finalize_approval(args: Args, ctx: JobContext) -> dict[str, Any]:
    approvals = sorted(r["approval_type"] for r in (args.get("parents") or {}).values())
    return {"approved": True, "approval_path": _PATHS.get(tuple(approvals), "other"),
            "approvals": approvals, "amount": _amount(args)}


# -- csv_batch -------------------------------------------------------------------------------

def _rows(context: dict[str, Any]) -> list[list[str]]:
    """The data rows of context.csv: CSV text, or the path of a CSV file."""
    text = context.get("csv")
    if not isinstance(text, str):
        raise PermanentError("context.csv must be CSV text or the path of a CSV file")
    if "\n" not in text and Path(text).is_file():
        text = Path(text).read_text()
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    return rows[1:]  # the first row names the columns


def wf_analyze_csv(args: Args, ctx: JobContext) -> dict[str, Any]:
    """Cut the rows into ranges of ``batch_size``, at most ``max_workers`` (5) of them,
    widening the ranges when needed."""
    context = _context(args)
    rows = len(_rows(context))
    size = int(context.get("batch_size", 200))
    most = int(context.get("max_workers", 5))
    if size < 1 or most < 1:
        raise PermanentError("batch_size and max_workers must be 1 or more")
    if rows == 0:
        return {"batches": [], "rows": 0}
    workers = min(math.ceil(rows / size), most)
    width = math.ceil(rows / workers)
    cursors = [{"start": i * width, "end": min((i + 1) * width, rows)} for i in range(workers)]
    return {"batches": cursors, "rows": rows}


def _column(context: dict[str, Any], header: list[str]) -> int:
    name = context.get("sum_column")
    if name is None:
        return 1 if len(header) > 1 else 0
    if name not in header:
        raise PermanentError(f"no column {name!r} in {header}")
    return header.index(name)


def wf_process_csv_batch(args: Args, ctx: JobContext) -> dict[str, Any]:
    """Process the rows of this instance's range; their count and the column's sum."""
    context = _context(args)
    cursor = args.get("batch") or {}
    text = context.get("csv")
    assert isinstance(text, str)
    if "\n" not in text and Path(text).is_file():
        text = Path(text).read_text()
    header = next(csv.reader(io.StringIO(text)), [])
    rows = _rows(context)[int(cursor["start"]):int(cursor["end"])]
    column = _column(context, header)
    total = sum(float(row[column]) for row in rows)
    return {"rows_processed": len(rows), "sum": total, "start": cursor["start"],
            "end": cursor["end"]}


def wf_aggregate_csv_results(args: Args, ctx: JobContext) -> dict[str, Any]:
    results = (args.get("parents") or {}).get("process_csv_batch") or []
    return {"total_processed": sum(r["rows_processed"] for r in results),
            "worker_count": len(results),
            "column_total": sum(r["sum"] for r in results)}


# -- error scenarios ---------------------------------------------------------------------------

def wf_fail_n_times(args: Args, ctx: JobContext) -> dict[str, Any]:
    """Fail (retryably) on attempts up to ``fail_count``, then succeed."""
    fail_count = int((args.get("args") or {}).get("fail_count", 2))
    if ctx.attempt <= fail_count:
        raise RuntimeError(f"attempt {ctx.attempt} of the first {fail_count} fails")
    return {"attempts_before_success": ctx.attempt}


def wf_permanent_error(args: Args, ctx: JobContext) -> None:
    raise PermanentError("Invalid payment method: test_invalid_card")


def wf_retryable_error(args: Args, ctx: JobContext) -> None:
    raise RuntimeError("Payment service timeout after 30s")


def wf_succeed(args: Args, ctx: JobContext) -> dict[str, Any]:
    return {"ok": True}


def wf_sleep(args: Args, ctx: JobContext) -> dict[str, Any]:
    """Sleep for the step's ``seconds`` (1): a step to cancel while it runs."""
    seconds = float((args.get("args") or {}).get("seconds", 1))
    time.sleep(seconds)
    return {"slept": seconds}


HANDLERS: dict[str, Callable[[Args, JobContext], Any]] = {
    fn.__name__: fn for fn in (
        wf_square_number, wf_add_ten, wf_times_three, wf_halve, wf_square_parent,
        wf_square_product, wf_validate_request, wf_routing_decision, wf_approve,
        wf_finalize_approval, wf_analyze_csv, wf_process_csv_batch, wf_aggregate_csv_results,
        wf_fail_n_times, wf_permanent_error, wf_retryable_error, wf_succeed, wf_sleep)}
