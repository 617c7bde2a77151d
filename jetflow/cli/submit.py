"""``jetflow submit``: submit a job, and with ``--wait`` print its outcome."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jetflow.cli.options import common_options, json_arg, seconds
from jetflow.cli.output import error

if TYPE_CHECKING:
    from jetflow.adapters.client import Submitted

__all__ = ["add_commands"]


async def cmd_submit(a: argparse.Namespace) -> int:
    from jetflow.adapters.client import SubmissionRejected, connect

    args = json_arg(a.args, "--args")
    client = await connect(a.nats)
    try:
        submitted = await client.submit_result(
            a.handler, args, queue=a.queue, priority=a.priority, job_id=a.job_id,
            max_attempts=a.max_attempts, timeout_s=a.timeout,
            queue_timeout_s=a.queue_timeout, deadline_s=a.deadline,
            input=_absolute(a.input), output=_absolute(a.output))
    except SubmissionRejected as exc:
        if a.json:
            print(json.dumps({"job_id": exc.job_id,
                              "rejected": {"code": exc.code, "reason": exc.reason}}))
        else:
            print(f"rejected: {exc.reason} [{exc.code}] (job {exc.job_id})", file=sys.stderr)
        await client.close()
        return 2
    job_id = submitted.job_id
    if submitted.differs:
        print(f"warning: {submitted.warning()}", file=sys.stderr)
    if not a.wait:
        print(json.dumps(_submit_json(submitted)) if a.json else job_id)
        await client.close()
        return 0
    try:
        job = await client.wait(job_id, timeout=a.wait_timeout)
    except TimeoutError:
        state = (await client.status(job_id)).state
        return error(a, f"timed out: job {job_id} is still {state} after "
                        f"{a.wait_timeout:g}s; it goes on (`jetflow job {job_id}`)",
                     job_id=job_id, state=state)
    finally:
        await client.close()
    _print_final(job, a.json, submitted)
    return 0 if job.state == "succeeded" else 1


def _absolute(path: str | None) -> str | None:
    """A path as a worker on this machine sees it (they run in other directories)."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _submit_json(submitted: Submitted) -> dict[str, Any]:
    out: dict[str, Any] = {"job_id": submitted.job_id}
    if submitted.duplicate:
        out["duplicate"] = True
    if submitted.differs:
        out["differs"] = list(submitted.differs)
    return out


def _print_final(job: Any, as_json: bool, submitted: Submitted) -> None:
    if as_json:
        print(json.dumps({**_submit_json(submitted), "state": job.state,
                          "attempt": job.attempt, "result": job.result, "error": job.error}))
        return
    print(f"{job.job_id} {job.state} (attempt {job.attempt})")
    if job.result is not None:
        print(f"result: {json.dumps(job.result)}")
    if job.error:
        print(f"error: {job.error.get('error_type', '')}: {job.error.get('message', '')}")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a job",
                       description="Submit a job; prints its id (with --wait, its outcome; "
                                   "exit 1 if it did not succeed, 2 if rejected).")
    common_options(p)
    p.add_argument("handler")
    p.add_argument("--args", default="{}", metavar="JSON|@FILE|-",
                   help="the job's arguments: a JSON object, @FILE to read it from a file, "
                        "or - to read it from stdin ({})")
    p.add_argument("--queue", default="default")
    p.add_argument("--priority", type=int, default=0, help="0-9, higher first")
    p.add_argument("--job-id", help="your own id (1-64 characters of A-Z a-z 0-9 _ -); "
                   "submitting it again is idempotent")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--timeout", type=seconds, help="seconds per attempt (the child is killed)")
    p.add_argument("--queue-timeout", type=seconds,
                   help="give up (timed_out) if not started within this many seconds")
    p.add_argument("--deadline", type=seconds,
                   help="seconds from submission to finish, across all attempts")
    p.add_argument("--input", metavar="PATH",
                   help="a plugin job's input file (the path its parse() reads)")
    p.add_argument("--output", metavar="DIR", help="a plugin job's output directory "
                   "(default <worker data>/outputs/<plugin>/)")
    p.add_argument("--wait", action="store_true", help="wait for the outcome")
    p.add_argument("--wait-timeout", type=seconds, default=300.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_submit)
