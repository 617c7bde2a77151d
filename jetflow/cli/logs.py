"""``jetflow logs ID [--attempt N] [-f]``: a job's output lines from ``JF_LOGS`` (what its
handler or plugin printed, its stderr and logging), in order; ``-f`` follows them, and
its ``progress`` events, until the job has ended, across retries."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING, Any

from jetflow.cli.options import common_options, positive_int

if TYPE_CHECKING:
    from jetflow.adapters.client import Client
    from jetflow.core.events import Event

__all__ = ["add_commands"]


def _line(msg: Any, as_json: bool) -> str:
    attempt = msg.subject.rsplit(".", 1)[-1]
    stream = (msg.headers or {}).get("Jf-Stream", "stdout")
    text = msg.data.decode(errors="replace")
    if as_json:
        return json.dumps({"attempt": int(attempt) if attempt.isdigit() else attempt,
                           "stream": stream, "line": text})
    return f"[{attempt} {stream}] {text}"


def _progress_line(event: Event, as_json: bool) -> str:
    d = event.data
    if as_json:
        return json.dumps({"progress": d})
    total = f"/{d.get('total')}" if d.get("total") is not None else ""
    return f"[{d.get('attempt')} progress] {d.get('done')}{total}"


async def cmd_logs(a: argparse.Namespace) -> int:
    from jetflow.adapters.bus import messages_on
    from jetflow.adapters.client import JobError, connect
    from jetflow.core import subjects as S

    client = await connect(a.nats)
    job_id = S.check_job_id(a.job_id)
    filter_ = f"{S.PREFIX}.log.{job_id}.{a.attempt or '*'}"
    try:
        if await client.last_event(job_id) is None:
            raise JobError(f"no job {job_id!r} in the log")
        if a.follow:
            return await _follow(client, job_id, filter_, a.json)
        for msg in await messages_on(client.js, [filter_], stream=S.LOGS_STREAM):
            print(_line(msg, a.json))
        return 0
    finally:
        await client.close()


async def _follow(client: Client, job_id: str, filter_: str, as_json: bool) -> int:
    from jetflow.adapters.bus import Tail
    from jetflow.core import subjects as S

    lines = Tail(client.js, S.LOGS_STREAM, filter_subjects=[filter_], idle_s=0.3)
    events = Tail(client.js, S.EVENTS_STREAM, filter_subjects=[S.job_filter(job_id)],
                  idle_s=0.3)
    ended = asyncio.Event()

    async def follow_lines() -> None:
        async for batch in lines.batches():
            for msg in batch:
                print(_line(msg, as_json), flush=True)
            if not batch and ended.is_set():
                return  # the job ended and every line up to now is out

    try:
        await asyncio.gather(follow_lines(), _follow_events(events, ended, as_json))
    finally:
        await lines.close()
        await events.close()
    final = await client.status(job_id)
    if not as_json:
        print(f"job {job_id} {final.state} (attempt {final.attempt})")
    return 0 if final.state == "succeeded" else 1


async def _follow_events(events: Any, ended: asyncio.Event, as_json: bool) -> None:
    from jetflow.core.codec import CodecError, decode_event
    from jetflow.core.job import TERMINAL

    async for batch in events.batches():
        for msg in batch:
            try:
                event = decode_event(msg.subject, msg.data, 0)
            except CodecError:
                continue
            if event.type == "progress":
                print(_progress_line(event, as_json), flush=True)
            elif event.type in TERMINAL:
                ended.set()
                return


def add_commands(sub: Any) -> None:
    p = sub.add_parser("logs", help="a job's output lines (-f: follow until it ends)",
                       description="Print what a job's handler or plugin printed (stdout, "
                                   "stderr, logging), in order, from JF_LOGS.")
    common_options(p)
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--attempt", type=positive_int, help="only this attempt's lines")
    p.add_argument("-f", "--follow", action="store_true",
                   help="follow until the job has ended, across retries, with its progress "
                        "(exit 0 if it succeeded, 1 otherwise)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_logs)
