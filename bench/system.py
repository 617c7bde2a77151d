"""`make bench`: jetflow as a user runs it (``jetflow up``, its defaults) next to the raw
JetStream floor, in one run, each result a ratio of figures taken minutes apart.

::

    .venv/bin/python -m bench.system            # the whole run, ~6 minutes
    .venv/bin/python -m bench.system --quick    # a smoke run (small numbers)

1. **raw floor**: ``bench.throughput``'s minimal JetStream round trip (a producer, a
   consumer process that fetches, publishes one ``done`` per job and acks).
2. **burst**: ``jetflow up --workers N --handlers echo`` for N = 1, 2, 4 (projector on,
   concurrency 8); ``--jobs`` no-op jobs of 256 bytes published back to back on
   ``jf.submit.default`` (what ``nats pub`` does), and for 2 workers also through
   ``client.submit_many``; done when the ``succeeded`` event of each was seen on
   ``jf.job.*.succeeded``. jobs/s = jobs / (last succeeded - first submit).
3. **latency**: one awaited ``client.submit`` at a time, paced at 100 and at 1,000
   jobs/s; submit start -> ``succeeded`` seen.
4. **submit_many**: the rate at which ``client.submit_many`` gets ``--jobs`` submissions
   recorded in the log (answered by the sentinel), into a queue no worker serves: after
   the memory run below (the log and its dedup window hold 100,000 jobs' events), and
   on a fresh stack. Each steady measurement waits for the projector to catch up first.
5. **memory**: RSS of the sentinel, a worker and the projector after 20,000 jobs and
   after ``--rss-jobs`` (100,000): flat means nothing grows with history.
6. **restart**: 1,000,000 synthetic events in the log; a sentinel folds them (and stores
   its snapshot), is stopped, and a new one is started: seconds until it answers.

Prints a table and writes ``bench/results/system-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.throughput import Options, bench_raw, latency_summary, machine_info
from jetflow import Client, connect
from jetflow.adapters.auth import Credentials
from jetflow.adapters.bus import connect as bus_connect
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.natsclient import Client as RawClient
from jetflow.core import subjects as S
from jetflow.projections.synthetic import publish_log, synthetic_log

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
PAD = "x" * 200  # a 256-byte job document with its fields
_T0 = time.monotonic()


def write_results(kind: str, stamp: str, report: dict[str, Any]) -> Path:
    """``bench/results/<kind>-<stamp>.json``, the report of one run."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{kind}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    return out


def say(text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a stack as a user starts it ------------------------------------------------------------

@dataclass
class Up:
    proc: asyncio.subprocess.Process
    url: str
    data: Path

    async def client(self, role: str = "submitter") -> Client:
        """A client as a user of this stack connects: anonymous (the submitter role),
        or with ``<data>/contexts/<role>.json`` (admin: deploys, registrations); over TLS
        when the stack serves it, trusting its CA."""
        context = self.data / "contexts" / f"{role}.json"
        if role != "submitter" and context.exists():
            return await connect(self.url, context=context)
        ca = self.data / "tls" / "ca.pem"
        return await (connect(self.url, ca=str(ca)) if ca.exists() else connect(self.url))

    async def raw(self, role: str = "submitter") -> RawClient:
        """A raw connection (jetflow.adapters.natsclient), as :meth:`client` connects."""
        context = self.data / "contexts" / f"{role}.json"
        if role != "submitter" and context.exists():
            return await bus_connect(self.url, credentials=Credentials(
                context=str(context)).with_context())
        ca = self.data / "tls" / "ca.pem"
        return await bus_connect(self.url, credentials=Credentials(
            ca=str(ca) if ca.exists() else None))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def rss_mb(self) -> dict[str, float]:
        """RSS of each service `up` runs, by name (the first of each kind)."""
        out: dict[str, float] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != self.proc.pid:
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
                name = next((c.decode() for c in cmd if c in (b"sentinel", b"worker",
                                                               b"projector")), None)
                if name and name not in out:
                    pages = int((stat.parent / "statm").read_text().split()[1])
                    out[name] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
            except (OSError, ValueError, IndexError):
                continue
        return out


async def jetflow_up(workdir: Path, workers: int, handlers: str | None = "echo",
                     flags: tuple[str, ...] = ()) -> Up:
    """``jetflow up --workers N --handlers H [flags]`` (``handlers=None``: up's default
    set)."""
    port = free_port()
    data = workdir / f"up-{workers}-{port}"
    log = (workdir / f"up-{workers}-{port}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "up", "--port", str(port), "--data", str(data),
        "--workers", str(workers), *(["--handlers", handlers] if handlers else []), *flags,
        stdout=log, stderr=log,
        stdin=asyncio.subprocess.DEVNULL)
    up = Up(proc, f"nats://127.0.0.1:{port}", data)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client = await up.client()
            try:
                await client.submit("echo", {"probe": 1}, reply_timeout_s=3)
                return up
            finally:
                await client.close()
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.3)
    await up.stop()
    raise RuntimeError(f"jetflow up did not answer; see {log.name}")


class Collector:
    """The ``succeeded`` events of a run's jobs, as a raw subscription sees them: the
    time each was seen, by the job's number (``args.i``)."""

    def __init__(self, nc: RawClient, run: str) -> None:
        self.nc, self.run = nc, run.encode()
        self.seen: dict[int, float] = {}
        self.changed = asyncio.Event()

    async def __aenter__(self) -> Collector:
        self._sub = await self.nc.subscribe_raw(f"{S.PREFIX}.job.*.succeeded", self._on)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.unsubscribe_raw(self._sub)

    def _on(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        now = time.time()
        if self.run not in data:
            return
        try:
            args = orjson.loads(data)["data"]["result"]
            if args.get("run") == self.run.decode():
                self.seen.setdefault(int(args["i"]), now)
                self.changed.set()
        except (ValueError, KeyError, TypeError, AttributeError):
            return

    async def until(self, n: int, stall_s: float = 60.0) -> None:
        while len(self.seen) < n:
            self.changed.clear()
            before = len(self.seen)
            try:
                await asyncio.wait_for(self.changed.wait(), stall_s)
            except TimeoutError:
                raise RuntimeError(f"{n - before} of {n} jobs not seen in {stall_s:g}s "
                                   "of silence") from None


def job(run: str, i: int) -> dict[str, Any]:
    return {"run": run, "i": i, "t": time.time(), "pad": PAD}


# -- the measurements -------------------------------------------------------------------------

async def burst_pub(up: Up, n: int, run: str) -> dict[str, Any]:
    nc = await up.raw()
    try:
        async with Collector(nc, run) as seen:
            start = time.time()
            for i in range(n):
                await nc.publish(S.submit_subject("default"),
                                 orjson.dumps({"handler": "echo", "args": job(run, i)}))
            await nc.flush()
            submitted = time.time()
            await seen.until(n)
    finally:
        await nc.close()
    end = max(seen.seen.values())
    return {"jobs": n, "jobs_per_s": round(n / (end - start), 1),
            "submit_per_s": round(n / (submitted - start), 1)}


async def burst_many(up: Up, n: int, run: str) -> dict[str, Any]:
    client = await up.client()
    nc = await up.raw()
    try:
        async with Collector(nc, run) as seen:
            start = time.time()
            await client.submit_many([("echo", job(run, i)) for i in range(n)])
            submitted = time.time()
            await seen.until(n)
    finally:
        await client.close()
        await nc.close()
    end = max(seen.seen.values())
    return {"jobs": n, "jobs_per_s": round(n / (end - start), 1),
            "submit_per_s": round(n / (submitted - start), 1)}


async def paced(up: Up, n: int, rate: float, run: str) -> dict[str, Any]:
    client = await up.client()
    nc = await up.raw()
    started: dict[int, float] = {}
    try:
        async with Collector(nc, run) as seen:
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                started[i] = time.time()
                await client.submit("echo", job(run, i))
            await seen.until(n)
    finally:
        await client.close()
        await nc.close()
    summary = latency_summary([seen.seen[i] - started[i] for i in range(n)])
    return {"rate": rate, "jobs": n, **{k: round(v, 2) if isinstance(v, float) else v
                                         for k, v in summary.items()}}


async def settled(up: Up, timeout_s: float = 120.0) -> float:
    """Wait until the projector has applied the whole log (a burst leaves it behind for a
    while, and what it still has to do would be measured with the next figure); the
    seconds it took, also said."""
    nc = await up.raw()
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout_s:
            head = (await nc.jetstream().stream_info(S.EVENTS_STREAM)).state.last_seq
            where = orjson.loads((await nc.request(S.PROJECTOR_WHERE, b"", timeout=5)).data)
            if int(where["seq"]) >= head:
                break
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    took = round(time.monotonic() - start, 2)
    say(f"  (the projector caught up with the log in {took:g}s)")
    return took


async def submit_many_rate(up: Up, n: int, run: str) -> dict[str, Any]:
    await settled(up)
    client = await up.client()
    try:
        jobs = [{"handler": "echo", "args": job(run, i), "queue": "nobody"} for i in range(n)]
        start = time.perf_counter()
        ids = await client.submit_many(jobs)
        took = time.perf_counter() - start
    finally:
        await client.close()
    assert len(set(ids)) == n
    return {"jobs": n, "submissions_per_s": round(n / took, 1)}


async def memory(up: Up, n: int, run: str) -> dict[str, Any]:
    """RSS after 20,000 jobs and after ``n``, the jobs run in bursts of 10,000."""
    samples: dict[str, dict[str, float]] = {}
    done = 0
    while done < n:
        chunk = min(10_000, n - done)
        await burst_pub(up, chunk, f"{run}-{done}")
        done += chunk
        if done in (min(20_000, n), min(60_000, n), n):
            await asyncio.sleep(2.0)  # what is freed by then, is freed
            samples[str(done)] = up.rss_mb()
            say(f"  RSS after {done:,} jobs: {samples[str(done)]}")
    return {"jobs": n, "rss_mb": samples}


async def restart(workdir: Path, events: int) -> dict[str, Any]:
    """Seconds until a restarted sentinel answers, with ``events`` in the log."""
    async with EmbeddedServer(workdir / "restart", port=0) as server:
        nc = await bus_connect(server.url)
        from jetflow.adapters.bus import ensure_streams

        await ensure_streams(nc.jetstream())
        say(f"  publishing {events:,} synthetic events")
        await publish_log(nc, synthetic_log(events, seed=7))
        await nc.close()
        first = await _sentinel_ready(server.url, workdir / "sentinel-1.log")
        say(f"  a first sentinel folded the log in {first['ready_s']:.1f}s")
        await first.pop("stop")()
        second = await _sentinel_ready(server.url, workdir / "sentinel-2.log")
        await second.pop("stop")()
        return {"events": events, "first_start_s": round(first["ready_s"], 2),
                "restart_s": round(second["ready_s"], 2)}


async def _sentinel_ready(url: str, log_path: Path) -> dict[str, Any]:
    started = time.monotonic()
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "sentinel", "--nats", url, stdout=log,
        stderr=log, stdin=asyncio.subprocess.DEVNULL)
    nc = await bus_connect(url)
    try:
        while True:
            try:
                await nc.request(S.SENTINEL_PING, b"", timeout=0.5)
                break
            except Exception:  # noqa: BLE001 - not ready yet
                if proc.returncode is not None or time.monotonic() - started > 300:
                    raise RuntimeError(f"no sentinel; see {log_path}") from None
                await asyncio.sleep(0.05)
        ready = time.monotonic() - started
    finally:
        await nc.close()

    async def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    return {"ready_s": ready, "stop": stop}


# -- the run --------------------------------------------------------------------------------

async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(), "jobs": args.jobs}
    say("raw floor")
    raw_opts = Options(jobs=args.jobs, rate=100.0, seconds=2.0, concurrency=4, workers=2,
                       with_projector=False, in_flight=64, warmup=200)
    raw = await bench_raw(raw_opts, workdir / "raw")
    report["raw"] = raw
    report["burst"] = {}
    for workers in args.workers:
        say(f"jetflow up --workers {workers}")
        up = await jetflow_up(workdir, workers)
        try:
            await burst_pub(up, min(500, args.jobs), f"warm{workers}")
            result = {"pub": await burst_pub(up, args.jobs, f"pub{workers}")}
            say(f"  burst, nats pub: {result['pub']['jobs_per_s']:,} jobs/s")
            if workers == 2:
                result["submit_many"] = await burst_many(up, args.jobs, "many2")
                say(f"  burst, submit_many: {result['submit_many']['jobs_per_s']:,} jobs/s")
                await settled(up)
                report["latency"] = [await paced(up, n, rate, f"lat{int(rate)}")
                                     for rate, n in ((100.0, args.light_jobs),
                                                     (1000.0, args.paced_jobs))]
                for lat in report["latency"]:
                    say(f"  paced {lat['rate']:g}/s: p50 {lat['p50_ms']} ms, p99 "
                        f"{lat['p99_ms']} ms, max {lat['max_ms']} ms")
                report["memory"] = await memory(up, args.rss_jobs, "rss")
                report["submit_many"] = await submit_many_rate(up, args.jobs, "sm")
                say(f"  submit_many: {report['submit_many']['submissions_per_s']:,}/s")
            report["burst"][str(workers)] = result
        finally:
            await up.stop()
    say("submit_many into a fresh log (jetflow up --workers 2)")
    up = await jetflow_up(workdir, 2)
    try:
        report["submit_many_fresh"] = await submit_many_rate(up, args.jobs, "smf")
        say(f"  submit_many: {report['submit_many_fresh']['submissions_per_s']:,}/s")
    finally:
        await up.stop()
    say("sentinel restart")
    report["restart"] = await restart(workdir, args.events)
    return report


def _raw_burst(report: dict[str, Any]) -> float | None:
    value = (report.get("raw") or {}).get("throughput", {}).get("jobs_per_s")
    return round(float(value), 1) if isinstance(value, int | float) else None


def table(report: dict[str, Any]) -> str:
    floor = _raw_burst(report)
    lines = ["| measurement | value | ratio to the raw floor |", "|---|---|---|",
             f"| raw JetStream round trip, burst | {floor or '-'} jobs/s | 1.00 |"]
    raw_latency = (report.get("raw") or {}).get("latency", {}).get("latency_observed", {})
    if raw_latency:
        lines.append("| raw JetStream round trip at 100/s (p50 / p99 / max) | "
                     f"{raw_latency['p50_ms']:.2f} / {raw_latency['p99_ms']:.2f} / "
                     f"{raw_latency['max_ms']:.2f} ms | |")
    for workers, result in report["burst"].items():
        for mode, r in result.items():
            ratio = f"{r['jobs_per_s'] / floor:.2f}" if floor else "-"
            lines.append(f"| jetflow up --workers {workers}, burst via {mode} | "
                         f"{r['jobs_per_s']:,} jobs/s | {ratio} |")
    for lat in report.get("latency", []):
        lines.append(f"| latency at {lat['rate']:g} jobs/s (p50 / p99 / max) | "
                     f"{lat['p50_ms']} / {lat['p99_ms']} / {lat['max_ms']} ms | |")
    if "submit_many_fresh" in report:
        lines.append(f"| client.submit_many into a fresh log | "
                     f"{report['submit_many_fresh']['submissions_per_s']:,} submissions/s | |")
    if "submit_many" in report:
        lines.append(f"| client.submit_many into the log, after the 100,000 jobs above | "
                     f"{report['submit_many']['submissions_per_s']:,} submissions/s | |")
    for jobs, rss in report.get("memory", {}).get("rss_mb", {}).items():
        lines.append(f"| RSS after {int(jobs):,} jobs | {rss} MB | |")
    r = report.get("restart")
    if r:
        lines.append(f"| sentinel start with {r['events']:,} events: first (fold) / "
                     f"restart (snapshot) | {r['first_start_s']} s / {r['restart_s']} s | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.system", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--light-jobs", type=int, default=1000)
    p.add_argument("--paced-jobs", type=int, default=5000)
    p.add_argument("--rss-jobs", type=int, default=100_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 4])
    p.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.light_jobs, args.paced_jobs = 1000, 100, 500
        args.rss_jobs, args.events, args.workers = 20_000, 50_000, [2]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="jetflow-bench-") as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    report["stamp"] = stamp
    print(table(report))
    print(f"\nwritten: {write_results('system', stamp, report)}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
