"""``jetflow cancel`` and ``jetflow retry``: an operator's requests to the sentinel."""

from __future__ import annotations

import argparse
import json
from typing import Any

from jetflow.cli.options import common_options, positive_int

__all__ = ["add_commands"]


async def cmd_cancel(a: argparse.Namespace) -> int:
    return await _control(a, "cancel")


async def cmd_retry(a: argparse.Namespace) -> int:
    return await _control(a, "retry")


async def _control(a: argparse.Namespace, verb: str) -> int:
    from jetflow.adapters.client import connect

    client = await connect(a.nats)
    try:
        if verb == "cancel":
            answer = await client.cancel(a.job_id, a.reason)
        else:
            answer = await client.retry(a.job_id, a.attempts)
    finally:
        await client.close()
    if a.json:
        print(json.dumps(answer))
    elif answer.get("noop"):
        print(answer["message"])
    elif verb == "cancel":
        print(f"{a.job_id}: cancel requested" + (" (stopping its process)"
                                                 if answer.get("running") else ""))
    else:
        print(f"{a.job_id}: queued again for attempt {answer['attempt']} "
              f"(up to {answer['max_attempts']})")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("cancel", help="cancel a job (queued: at once; running: stops it)")
    common_options(p)
    p.add_argument("job_id")
    p.add_argument("--reason", help="recorded in the cancel_requested event")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_cancel)

    p = sub.add_parser("retry", help="re-drive a dead-lettered job (its history is kept)")
    common_options(p)
    p.add_argument("job_id")
    p.add_argument("--attempts", type=positive_int, default=3, help="more attempts to allow (3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_retry)
