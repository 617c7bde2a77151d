"""Where a job's time goes, on a stack as a user starts it (``jetflow up --workers 2
--handlers echo``, its defaults; extra ``up`` flags after ``--``).

::

    .venv/bin/python -m bench.where cpu            # CPU per job of each process, a burst
    .venv/bin/python -m bench.where hops           # latency per hop at 100 jobs/s
    .venv/bin/python -m bench.where cpu -- --concurrency 16

``cpu``: user + system time (``/proc/<pid>/stat``) of every process ``up`` runs, its
children summed with their parent (a worker's handler processes with it), before and
after a burst of ``--jobs`` no-op jobs published on ``jf.submit.default``; divided by the
jobs. ``hops``: one awaited ``client.submit`` at a time at ``--rate``; an admin
connection sees, on core subscriptions, the request, the ``submitted`` append, the offer
on ``jf.work.<worker>``, ``started`` and ``succeeded`` as each is published (before it is
stored), and the time between each and the next is a hop. Prints a table; writes
``bench/results/where-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.system import Up, burst_pub, jetflow_up, job, write_results
from bench.throughput import latency_summary, machine_info
from jetflow.core import subjects as S
from jetflow.core.metadata import headers_of
from jetflow.core.submission import derive_job_id

TICKS = os.sysconf("SC_CLK_TCK")
SERVICES = (b"sentinel", b"worker", b"projector")
HOPS = ("request", "submitted", "offer", "started", "succeeded")


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds so far of the processes under ``root``, by what they are: nats-server,
    sentinel, worker (its children included), projector."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    out: dict[str, float] = {}

    def walk(pid: int, owner: str | None) -> None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        name = owner or next((a.decode() for a in argv if a in SERVICES), None)
        if name is None and argv and argv[0].endswith(b"nats-server"):
            name = "nats-server"
        if name is not None:
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
        for child in children.get(pid, []):
            walk(child, name)

    walk(root, None)
    return out


async def cpu(up: Up, jobs: int) -> dict[str, Any]:
    assert up.proc.pid is not None
    before = cpu_seconds(up.proc.pid)
    burst = await burst_pub(up, jobs, "where-cpu")
    after = cpu_seconds(up.proc.pid)
    per_job = {name: round(1e3 * (after[name] - before.get(name, 0.0)) / jobs, 3)
               for name in sorted(after)}
    return {"jobs": jobs, "jobs_per_s": burst["jobs_per_s"], "cpu_ms_per_job": per_job,
            "total_ms_per_job": round(sum(per_job.values()), 3)}


class Marks:
    """When each job's messages were published, as an admin's core subscriptions see
    them (before they are stored): job id -> hop -> perf_counter time."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, float]] = {}

    def on(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        now = time.perf_counter()
        parts = subject.decode().split(".")
        if parts[1] == "submit":
            msg_id = headers_of(headers).get(S.HDR_MSG_ID)
            if msg_id:
                self.seen.setdefault(derive_job_id(msg_id, "", 0), {})["request"] = now
        elif parts[1] == "work" and len(parts) == 3:  # (not the acks of early offers)
            for offer in orjson.loads(data):
                self.seen.setdefault(offer["job_id"], {}).setdefault("offer", now)
        elif len(parts) == 4:
            self.seen.setdefault(parts[2], {}).setdefault(parts[3], now)

    def summary(self, called: dict[str, float]) -> dict[str, Any]:
        names = [f"{a} -> {b}" for a, b in zip(("submit called", *HOPS), HOPS, strict=False)]
        steps: dict[str, list[float]] = {name: [] for name in names}
        total: list[float] = []
        for job_id, at in called.items():
            marks = self.seen.get(job_id, {})
            if all(h in marks for h in HOPS):
                times = [at, *(marks[h] for h in HOPS)]
                for name, a, b in zip(names, times, times[1:], strict=False):
                    steps[name].append(b - a)
                total.append(marks["succeeded"] - at)
        return {"complete": len(total), "total": latency_summary(total),
                "hops": {name: latency_summary(v) for name, v in steps.items()}}


async def hops(up: Up, jobs: int, rate: float) -> dict[str, Any]:
    nc = await up.raw("admin")  # (offers are for workers and admins to see)
    marks = Marks()
    for subject in (f"{S.PREFIX}.submit.>", f"{S.PREFIX}.work.>", f"{S.PREFIX}.job.>"):
        await nc.subscribe_raw(subject, marks.on)
    await nc.flush()
    client = await up.client()
    called: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        for i in range(jobs):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            at = time.perf_counter()
            called[await client.submit("echo", job("where-hops", i))] = at
        await asyncio.sleep(1.0)
    finally:
        await client.close()
        await nc.close()
    return {"rate": rate, "jobs": jobs, **marks.summary(called)}


def table(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if "cpu" in report:
        c = report["cpu"]
        lines += [f"burst of {c['jobs']:,}: {c['jobs_per_s']:,} jobs/s", "",
                  "| process | CPU ms per job |", "|---|---|"]
        lines += [f"| {name} | {ms:.3f} |" for name, ms in c["cpu_ms_per_job"].items()]
        lines.append(f"| all | {c['total_ms_per_job']:.3f} |")
    if "hops" in report:
        h = report["hops"]
        lines += ["", f"{h['complete']} of {h['jobs']} jobs at {h['rate']:g}/s", "",
                  "| hop | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|"]
        for name, s in [*h["hops"].items(), ("submit called -> succeeded", h["total"])]:
            if not s.get("n"):
                lines.append(f"| {name} | - | - | - |")
                continue
            lines.append(f"| {name} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace, up_flags: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(), "up_flags": up_flags}
    with tempfile.TemporaryDirectory(prefix="jetflow-where-") as tmp:
        up = await jetflow_up(Path(tmp), 2, "echo", tuple(up_flags))
        try:
            await burst_pub(up, 1000, "where-warm")
            if args.what in ("cpu", "both"):
                report["cpu"] = await cpu(up, args.jobs)
            if args.what in ("hops", "both"):
                report["hops"] = await hops(up, args.light_jobs, args.rate)
        finally:
            await up.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    up_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench.where", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("cpu", "hops", "both"), nargs="?", default="both")
    p.add_argument("--jobs", type=int, default=10_000, help="jobs in the burst (10,000)")
    p.add_argument("--light-jobs", type=int, default=800, help="jobs at --rate (800)")
    p.add_argument("--rate", type=float, default=100.0, help="jobs/s for hops (100)")
    args = p.parse_args(ours)
    report = asyncio.run(run(args, up_flags))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report["stamp"] = stamp
    print(table(report))
    print(f"\nwritten: {write_results('where', stamp, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
