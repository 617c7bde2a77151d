"""`jetflow` commands that read: a job's history (and, later, the projections)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_commands"]


async def cmd_job(a: argparse.Namespace) -> int:
    from core.client import connect
    from core.job import fold
    from core.render import job_json, job_lines

    client = await connect(a.nats)
    events = await client.history(a.job_id)
    await client.close()
    if not events:
        print(f"no job {a.job_id!r} in the log", file=sys.stderr)
        return 1
    job = fold(events, a.job_id)
    print(json.dumps(job_json(job, events)) if a.json else "\n".join(job_lines(job, events)))
    return 0


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("job", help="a job's state and its full history, read from the stream")
    common(p)
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_job)
