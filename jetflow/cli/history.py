"""``jetflow job`` (the projection's view of a job, else the stream's) and ``jetflow
history`` (a job's history straight from the stream)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jetflow.cli.options import common_options, projection_options
from jetflow.cli.projection import projection_path
from jetflow.core.subjects import check_job_id
from jetflow.projections.schema import ProjectionError

__all__ = ["add_commands"]


async def cmd_job(a: argparse.Namespace) -> int:
    """The projection's view of a job when it has it, else the stream's."""
    from jetflow.cli.render import job_json, job_lines

    check_job_id(a.job_id)
    path = await projection_path(a, required=False)
    readable = path is not None and (a.db or path.exists())
    found = await _job_from_projection(a, path) if path is not None and readable else None
    if found is None:
        return await _print_history(a, source="stream", fallback=True)
    state, events, trace_id, seq, errors = found
    seqs = {e.seq for e in events}
    skipped = {u.seq: u.reason for u in errors if u.seq in seqs}
    unreadable = [u for u in errors if u.seq not in seqs]
    if a.json:
        print(json.dumps({**job_json(state, events, skipped, unreadable),
                          "trace_id": trace_id, "source": "projection", "as_of_seq": seq}))
    else:
        print("\n".join(job_lines(state, events, skipped, unreadable)))
        print(f"  (from the projection at seq {seq}"
              + (f", trace {trace_id})" if trace_id else ")"))
    return 0


async def _job_from_projection(a: argparse.Namespace, path: Path) -> Any:
    from jetflow.projections.queries import as_of, job_errors, job_from_projection
    from jetflow.projections.store import open_reader

    db = await open_reader(path)
    try:
        found, position = await job_from_projection(db, a.job_id), await as_of(db)
        if found is None and position["snapshot"]:  # not the present stream's job instead
            raise ProjectionError(f"no job {a.job_id!r} in the replay snapshot {path} "
                                  f"(`jetflow history {a.job_id}` reads the stream as it is "
                                  "now)")
        if found is None:
            return None
        return (*found, position["seq"], await job_errors(db, a.job_id))
    finally:
        await db.close()


async def cmd_history(a: argparse.Namespace) -> int:
    return await _print_history(a, source="stream")


async def _print_history(a: argparse.Namespace, *, source: str,
                         fallback: bool = False) -> int:
    """The job from its events in the stream; an event that may not happen is shown and
    marked as not applied, a message on its subjects that is no event as unreadable."""
    from jetflow.adapters.client import JobError, connect
    from jetflow.cli.render import job_json, job_lines
    from jetflow.core.job import fold_skipping

    check_job_id(a.job_id)
    client = await connect(a.nats)
    try:
        events, unreadable = await client.history_report(a.job_id)
    finally:
        await client.close()
    if not events and not unreadable:
        raise JobError(f"no job {a.job_id!r} in the log")
    job, skipped = fold_skipping(events, a.job_id)
    if a.json:
        print(json.dumps({**job_json(job, events, skipped, unreadable), "source": source}))
    else:
        print("\n".join(job_lines(job, events, skipped, unreadable)))
        if fallback:
            print("  (from the stream: the projection does not have this job)")
        if not events:
            print(f"  (no valid event of {a.job_id!r}: only unreadable messages)")
    return 0 if events else 1


def add_commands(sub: Any) -> None:
    p = sub.add_parser("job", help="a job's state and full history (from the projection "
                                   "when it has the job, else from the stream)")
    common_options(p)
    projection_options(p)
    p.add_argument("job_id")
    p.set_defaults(run=cmd_job)

    p = sub.add_parser("history", help="a job's history straight from the stream")
    common_options(p)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_history)

