"""Throughput and latency of jetflow next to a raw JetStream round trip, in one run.

::

    .venv/bin/python -m bench.throughput            # the full run (`make bench`)
    .venv/bin/python -m bench.throughput --quick    # a smoke run

Each measurement runs against its own embedded nats-server (the project's nats.conf) in a
temporary directory:

1. **raw floor** - the least a JetStream job system can do: a producer publishes jobs to
   ``BENCH_WORK`` (work queue, pipelined), a consumer in a separate OS process fetches them
   in batches, publishes one ``done`` event per job to ``BENCH_DONE`` (pipelined) and acks
   the job once its event is stored; the producer reads the done events back.
2. **jetflow throughput** - ``Stack(workers, concurrency)``: ``--jobs`` ``echo`` jobs
   submitted with ``--in-flight`` concurrent requests, waited for with ``wait_terminal``.
3. **jetflow latency** - a fresh stack, ``--rate`` jobs/s for ``--seconds``.

Both systems are measured the same way, on the same machine clock: throughput is
``jobs / (last final event's "at" - first publish/submit start)`` and latency is
``final event's "at" - publish/submit start``, where ``at`` is the actor's clock when it
wrote the final event (the raw consumer's ``done``, the worker's ``succeeded``).

Prints a table, writes ``bench/results/throughput-<UTC timestamp>.json`` and exits 1 when a
job was lost or did not succeed (the temporary directory, with every service's log, is then
kept and its path printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from jetflow import Client, connect
from jetflow.adapters.bus import TIMEOUTS, Publisher, Tail
from jetflow.adapters.bus import connect as bus_connect
from jetflow.adapters.nats_server import EmbeddedServer, find_binary
from jetflow.core.events import Event
from jetflow.up import Stack

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

RAW_WORK_STREAM = "BENCH_WORK"
RAW_DONE_STREAM = "BENCH_DONE"
RAW_WORK_SUBJECT = "bench.work.jobs"
RAW_CONSUMER = "bench-worker"
RAW_BATCH = 256  # jobs per fetch of the raw consumer
RAW_IN_FLIGHT = 1024  # unacknowledged publishes per raw publisher

STALL_S = 30.0  # no job finished for this long: the rest are lost
PROGRESS_S = 2.0

REFERENCE = [  # from the issue; NOT measured by this script
    ("raw JetStream round trip (this machine)", "5,400-6,400 jobs/s"),
    ("Dramatiq + Redis", "~2,300 jobs/s"),
    ("taskiq-nats", "~1,000 jobs/s"),
    ("Celery + Redis", "~650 jobs/s"),
]

_T0 = time.monotonic()


def say(text: str) -> None:
    """A progress line, on stderr (the table goes to stdout)."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


# -- options ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Options:
    jobs: int
    rate: float
    seconds: float
    concurrency: int
    workers: int
    with_projector: bool
    in_flight: int
    warmup: int

    @property
    def latency_jobs(self) -> int:
        return max(1, round(self.rate * self.seconds))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10_000, help="jobs of the throughput runs")
    p.add_argument("--rate", type=float, default=100.0, help="jobs/s of the latency runs")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the latency runs")
    p.add_argument("--concurrency", type=int, default=8, help="jobs at once per worker")
    p.add_argument("--workers", type=int, default=2, help="jetflow worker processes")
    p.add_argument("--with-projector", action="store_true",
                   help="run the jetflow stacks with the projector too")
    p.add_argument("--in-flight", type=int, default=200,
                   help="concurrent submits of the jetflow throughput run")
    p.add_argument("--warmup", type=int, default=50,
                   help="jobs run (and not measured) before each measurement")
    p.add_argument("--quick", action="store_true", help="smoke run: --jobs 1000 --seconds 3")
    p.add_argument("--raw-consumer", metavar="URL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    jobs, seconds = (1000, 3.0) if args.quick else (args.jobs, args.seconds)
    opts = Options(jobs=jobs, rate=args.rate, seconds=seconds, concurrency=args.concurrency,
                   workers=args.workers, with_projector=args.with_projector,
                   in_flight=args.in_flight, warmup=args.warmup)
    if min(opts.jobs, opts.concurrency, opts.workers, opts.in_flight) < 1 \
            or opts.rate <= 0 or opts.seconds <= 0 or opts.warmup < 0:
        raise SystemExit("--jobs, --concurrency, --workers, --in-flight, --rate and "
                         "--seconds must be positive")
    return opts


# -- statistics ---------------------------------------------------------------------------

def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    """n, mean and p50/p90/p99/max of latencies given in seconds, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ordered = sorted(s * 1000 for s in seconds)
    return {"n": len(ordered), "mean_ms": sum(ordered) / len(ordered),
            **{f"p{p}_ms": percentile(ordered, p) for p in (50, 90, 99)},
            "max_ms": ordered[-1]}


def per_second(jobs: int, start: float, end: float | None) -> float | None:
    if end is None or end <= start or jobs == 0:
        return None
    return jobs / (end - start)


# -- shared machinery ---------------------------------------------------------------------

@contextlib.asynccontextmanager
async def progress(describe: Callable[[], str]) -> AsyncIterator[None]:
    """Print ``describe()`` every PROGRESS_S while the block runs."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            say(describe())

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until_complete(step: Callable[[float], Awaitable[bool]],
                         count: Callable[[], int]) -> bool:
    """Call ``step(timeout)`` until it returns True; False once ``count()`` (the jobs
    finished so far) has not moved for STALL_S."""
    last, moved = count(), time.monotonic()
    while not await step(1.0):
        now = count()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            return False
    return True


async def paced(n: int, rate: float, fire: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Start ``fire(0..n-1)`` at ``rate`` per second, each as its own task; wait for all."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks: list[asyncio.Task[None]] = []
    for i in range(n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i)))
    await asyncio.gather(*tasks)


# -- raw floor: the consumer process --------------------------------------------------------

async def raw_consumer(url: str) -> None:
    """The raw consumer (run in its own process): fetch a batch, publish one done event per
    job, ack each job once its event is stored; the next fetch does not wait for that."""
    nc = await bus_connect(url, name="bench-raw-consumer")
    sub = await nc.jetstream().pull_subscribe_bind(RAW_CONSUMER, RAW_WORK_STREAM)
    publisher = Publisher(nc, max_in_flight=RAW_IN_FLIGHT)
    finishing: set[asyncio.Task[None]] = set()
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # the producer died without stopping us: quit
        try:
            msgs = await sub.fetch(RAW_BATCH, timeout=1.0)
        except TIMEOUTS:
            continue
        task = asyncio.create_task(_finish(publisher, msgs))
        finishing.add(task)
        task.add_done_callback(_forget(finishing))


async def _finish(publisher: Publisher, msgs: list[Msg]) -> None:
    stored = []
    for msg in msgs:
        job_id = orjson.loads(msg.data)["id"]
        body = orjson.dumps({"id": job_id, "at": time.time()})
        stored.append(await publisher.publish(f"bench.done.{job_id}", body, {}))
    await asyncio.gather(*stored)
    for msg in msgs:
        await msg.ack()


def _forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            print(f"raw consumer: {task.exception()!r}", file=sys.stderr, flush=True)
    return done


@contextlib.asynccontextmanager
async def raw_consumer_process(url: str, log_path: Path) -> AsyncIterator[None]:
    """``python -m bench.throughput --raw-consumer URL``, in its own session (a Ctrl-C here
    does not reach it: it is stopped below); ready once it printed 'ready'."""
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.throughput", "--raw-consumer", url, cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30.0)
        if line.strip() != b"ready":
            raise RuntimeError(f"the raw consumer did not start; see {log_path}")
        yield
    finally:
        await stop_process(proc)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- raw floor: the producer side -------------------------------------------------------------

async def create_raw_streams(js: JetStreamContext) -> None:
    await js.add_stream(StreamConfig(
        name=RAW_WORK_STREAM, subjects=["bench.work.>"], storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE))
    await js.add_stream(StreamConfig(
        name=RAW_DONE_STREAM, subjects=["bench.done.>"], storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS))
    await js.add_consumer(RAW_WORK_STREAM, ConsumerConfig(
        durable_name=RAW_CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0,
        max_ack_pending=8 * RAW_IN_FLIGHT, filter_subject="bench.work.>"))


@dataclass(frozen=True, slots=True)
class Done:
    at: float  # the raw consumer's clock when it published the done event
    observed: float  # the producer's clock when it read the event back


class DoneObserver:
    """Follows BENCH_DONE from its start: every job's done event, by job id."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.seen: dict[str, Done] = {}
        self._changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[DoneObserver]:
        tail = Tail(self.js, RAW_DONE_STREAM, idle_s=0.5)
        task = asyncio.create_task(self._follow(tail))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await tail.close()

    async def _follow(self, tail: Tail) -> None:
        async for batch in tail.batches():
            now = time.time()
            for msg in batch:
                body = orjson.loads(msg.data)
                self.seen[body["id"]] = Done(body["at"], now)
            if batch:
                self._changed.set()

    async def wait_for(self, ids: set[str]) -> bool:
        """True once every job of ``ids`` is done; False if they stall."""

        async def step(timeout: float) -> bool:
            if ids <= self.seen.keys():
                return True
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
            return ids <= self.seen.keys()

        return await until_complete(step, lambda: len(self.seen))


def raw_job(job_id: str) -> bytes:
    return orjson.dumps({"id": job_id})


async def raw_burst(publisher: Publisher, observer: DoneObserver,
                    ids: list[str]) -> dict[str, Any]:
    """Publish ``ids`` as fast as the window allows; wait until all are done."""
    baseline = len(observer.seen)
    start = time.time()
    with_progress = progress(lambda: f"raw: {len(observer.seen) - baseline:,}/"
                                     f"{len(ids):,} done")
    async with with_progress:
        acks = [await publisher.publish(RAW_WORK_SUBJECT, raw_job(j), {}) for j in ids]
        await asyncio.gather(*acks)
        published = time.time()
        await observer.wait_for(set(ids))
    done = [observer.seen[j] for j in ids if j in observer.seen]
    end = max((d.at for d in done), default=None)
    wall_end = max((d.observed for d in done), default=None)
    return {"jobs": len(ids), "done": len(done), "lost": len(ids) - len(done),
            "jobs_per_s": per_second(len(done), start, end),
            "jobs_per_s_observed": per_second(len(done), start, wall_end),
            "publish_s": published - start, "elapsed_s": (end or start) - start}


async def raw_paced(publisher: Publisher, observer: DoneObserver, n: int,
                    rate: float) -> dict[str, Any]:
    """``n`` jobs at ``rate``/s; latency of each from its publish to its done event."""
    starts: dict[str, float] = {}

    async def fire(i: int) -> None:
        job_id = f"l{i}"
        starts[job_id] = time.time()
        await (await publisher.publish(RAW_WORK_SUBJECT, raw_job(job_id), {}))

    baseline = len(observer.seen)
    async with progress(lambda: f"raw latency: {len(observer.seen) - baseline:,}/{n:,} done"):
        await paced(n, rate, fire)
        await observer.wait_for(set(starts))
    done = {j: observer.seen[j] for j in starts if j in observer.seen}
    return {"jobs": n, "rate": rate, "done": len(done), "lost": n - len(done),
            "latency": latency_summary([d.at - starts[j] for j, d in done.items()]),
            "latency_observed": latency_summary(
                [d.observed - starts[j] for j, d in done.items()])}


async def bench_raw(opts: Options, data_dir: Path) -> dict[str, Any]:
    async with EmbeddedServer(data_dir, port=0) as server:
        nc = await bus_connect(server.url, name="bench-raw-producer")
        try:
            await create_raw_streams(nc.jetstream())
            async with raw_consumer_process(server.url, data_dir / "raw-consumer.log"), \
                    DoneObserver(nc.jetstream()).running() as observer:
                return await raw_runs(nc, observer, opts)
        finally:
            await nc.close()


async def raw_runs(nc: NATS, observer: DoneObserver, opts: Options) -> dict[str, Any]:
    publisher = Publisher(nc, max_in_flight=RAW_IN_FLIGHT)
    if opts.warmup:
        await raw_burst(publisher, observer, [f"w{i}" for i in range(opts.warmup)])
    say(f"raw: throughput, {opts.jobs:,} jobs")
    throughput = await raw_burst(publisher, observer, [f"t{i}" for i in range(opts.jobs)])
    say(f"raw: latency, {opts.latency_jobs:,} jobs at {opts.rate:g}/s")
    latency = await raw_paced(publisher, observer, opts.latency_jobs, opts.rate)
    return {"throughput": throughput, "latency": latency,
            "setup": {"batch": RAW_BATCH, "publish_in_flight": RAW_IN_FLIGHT,
                      "consumer": "one separate OS process, pull consumer, explicit ack"}}


# -- jetflow ---------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def jetflow_client(opts: Options, data_dir: Path) -> AsyncIterator[Client]:
    """A fresh stack on a free port and a client already watching terminal events."""
    stack = Stack(data_dir=data_dir, port=0, workers=opts.workers,
                  concurrency=opts.concurrency, projector=opts.with_projector)
    async with stack:
        say(f"jetflow stack up at {stack.url}: {opts.workers} worker(s) x "
            f"{opts.concurrency}, projector {'on' if opts.with_projector else 'off'}")
        client = await connect(stack.url)
        try:
            await client.watch()
            yield client
        finally:
            await client.close()


async def wait_all_terminal(client: Client, ids: set[str]) -> dict[str, Event]:
    """Every job's terminal event; jobs missing from the answer are lost (they stalled)."""

    async def step(timeout: float) -> bool:
        try:
            await client.wait_terminal(ids, timeout)
        except TimeoutError:
            return False
        return True

    await until_complete(step, lambda: len(client.terminal))
    return {j: client.terminal[j] for j in ids if j in client.terminal}


@dataclass
class Submitted:
    """What a run of submissions got back: start times by job id, and failures."""

    starts: dict[str, float]
    errors: Counter[str]
    samples: dict[str, str]

    def fail(self, exc: Exception) -> None:
        name = type(exc).__name__
        self.errors[name] += 1
        self.samples.setdefault(name, str(exc))


async def submit_burst(client: Client, n: int, in_flight: int) -> Submitted:
    """Submit ``n`` echo jobs, ``in_flight`` requests at a time."""
    got = Submitted({}, Counter(), {})
    window = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with window:
            started = time.time()
            try:
                got.starts[await client.submit("echo", {"i": i})] = started
            except Exception as exc:  # noqa: BLE001 - counted and reported
                got.fail(exc)

    await asyncio.gather(*(one(i) for i in range(n)))
    return got


async def submit_paced(client: Client, n: int, rate: float) -> Submitted:
    got = Submitted({}, Counter(), {})

    async def fire(i: int) -> None:
        started = time.time()
        try:
            got.starts[await client.submit("echo", {"i": i})] = started
        except Exception as exc:  # noqa: BLE001 - counted and reported
            got.fail(exc)

    await paced(n, rate, fire)
    return got


async def outcomes(client: Client, jobs: int, got: Submitted,
                   events: dict[str, Event]) -> dict[str, Any]:
    """Counts of every outcome, and the histories of a few lost or failed jobs."""
    types = Counter(e.type for e in events.values())
    lost = sorted(set(got.starts) - events.keys())
    failed = sorted(j for j, e in events.items() if e.type != "succeeded")
    return {"jobs": jobs, "submitted": len(got.starts), "submit_errors": dict(got.errors),
            "submit_error_samples": got.samples, "succeeded": types.pop("succeeded", 0),
            "other_terminal": dict(types), "lost": len(lost),
            "examples": {j: await history_types(client, j) for j in (lost + failed)[:5]}}


async def history_types(client: Client, job_id: str) -> list[str]:
    try:
        return [f"{e.seq}:{e.type}" for e in await client.history(job_id)]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return [f"history unavailable: {exc!r}"]


def succeeded_at(events: dict[str, Event]) -> dict[str, float]:
    return {j: e.at for j, e in events.items() if e.type == "succeeded"}


async def jetflow_burst(client: Client, n: int, in_flight: int) -> dict[str, Any]:
    baseline = len(client.terminal)
    start = time.time()
    async with progress(lambda: f"jetflow: {len(client.terminal) - baseline:,}/{n:,} "
                                "finished"):
        got = await submit_burst(client, n, in_flight)
        submitted = time.time()
        events = await wait_all_terminal(client, set(got.starts))
    wall_end = time.time()
    done = succeeded_at(events)
    end = max(done.values(), default=None)
    return {**await outcomes(client, n, got, events),
            "jobs_per_s": per_second(len(done), start, end),
            "jobs_per_s_observed": per_second(len(done), start, wall_end),
            "submits_per_s": per_second(len(got.starts), start, submitted),
            "submit_in_flight": in_flight, "elapsed_s": (end or start) - start,
            "phases": phases(done, start, submitted, end)}


def phases(done: dict[str, float], start: float, submitted: float,
           end: float | None) -> dict[str, Any]:
    """Jobs finished while submissions were still coming in, and after the last one."""
    during = sum(1 for at in done.values() if at <= submitted)
    return {"submitting_s": submitted - start, "finished_while_submitting": during,
            "jobs_per_s_while_submitting": per_second(during, start, submitted),
            "finished_after_submits": len(done) - during,
            "jobs_per_s_after_submits": per_second(len(done) - during, submitted, end)}


async def jetflow_paced(client: Client, n: int, rate: float) -> dict[str, Any]:
    baseline = len(client.terminal)
    async with progress(lambda: f"jetflow latency: {len(client.terminal) - baseline:,}/"
                                f"{n:,} finished"):
        got = await submit_paced(client, n, rate)
        events = await wait_all_terminal(client, set(got.starts))
    done = succeeded_at(events)
    return {**await outcomes(client, n, got, events), "rate": rate,
            "latency": latency_summary([at - got.starts[j] for j, at in done.items()])}


async def bench_jetflow_throughput(opts: Options, data_dir: Path) -> dict[str, Any]:
    async with jetflow_client(opts, data_dir) as client:
        warmup = await jetflow_burst(client, opts.warmup, opts.in_flight) \
            if opts.warmup else None
        say(f"jetflow: throughput, {opts.jobs:,} jobs, {opts.in_flight} submits in flight")
        return {"warmup": warmup,
                "run": await jetflow_burst(client, opts.jobs, opts.in_flight)}


async def bench_jetflow_latency(opts: Options, data_dir: Path) -> dict[str, Any]:
    async with jetflow_client(opts, data_dir) as client:
        warmup = await jetflow_burst(client, opts.warmup, opts.in_flight) \
            if opts.warmup else None
        say(f"jetflow: latency, {opts.latency_jobs:,} jobs at {opts.rate:g}/s")
        return {"warmup": warmup,
                "run": await jetflow_paced(client, opts.latency_jobs, opts.rate)}


# -- the run -----------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    binary = find_binary()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "nats_server": version, "nats_server_binary": binary,
            "nats_py": importlib.metadata.version("nats-py"),
            "git_commit": commit + ("+dirty" if dirty else ""),
            "loadavg_start": os.getloadavg()}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                          check=False, cwd=REPO).stdout.strip()


def problems_of(report: dict[str, Any]) -> list[str]:
    """Everything that makes the run invalid: lost jobs, failed submits, other outcomes."""
    found = []
    for name, result in (("raw throughput", report["raw"]["throughput"]),
                         ("raw latency", report["raw"]["latency"])):
        if result["lost"]:
            found.append(f"{name}: {result['lost']} of {result['jobs']} jobs lost")
    for name, phase in (("jetflow throughput", report["jetflow"]["throughput"]),
                        ("jetflow latency", report["jetflow"]["latency"])):
        for part in ("warmup", "run"):
            found += jetflow_problems(f"{name} ({part})", phase[part])
    return found


def jetflow_problems(name: str, result: dict[str, Any] | None) -> list[str]:
    if result is None:
        return []
    found = []
    if result["submit_errors"]:
        found.append(f"{name}: submit errors {result['submit_errors']} "
                     f"(e.g. {result['submit_error_samples']})")
    if result["other_terminal"]:
        found.append(f"{name}: jobs ended other than succeeded: {result['other_terminal']}")
    if result["lost"]:
        found.append(f"{name}: {result['lost']} of {result['submitted']} submitted jobs "
                     f"never reached a terminal event ({STALL_S:g}s without progress)")
    if result["examples"]:
        found.append(f"{name}: histories of some of them: {result['examples']}")
    return found


async def run(opts: Options, workdir: Path) -> dict[str, Any]:
    machine = machine_info()
    say(f"raw floor: embedded nats-server, consumer in its own process "
        f"(data in {workdir / 'raw'})")
    raw = await bench_raw(opts, workdir / "raw")
    throughput = await bench_jetflow_throughput(opts, workdir / "jetflow-throughput")
    latency = await bench_jetflow_latency(opts, workdir / "jetflow-latency")
    machine["loadavg_end"] = os.getloadavg()
    jf, rw = throughput["run"]["jobs_per_s"], raw["throughput"]["jobs_per_s"]
    report = {
        "benchmark": "throughput", "argv": sys.argv[1:], "options": asdict(opts),
        "machine": machine, "raw": raw,
        "jetflow": {"throughput": throughput, "latency": latency},
        "ratio_jetflow_over_raw": jf / rw if jf and rw else None,
        "definitions": {
            "jobs_per_s": "jobs / (last final event's `at` - first publish/submit start)",
            "jobs_per_s_observed": "jobs / (when the client saw the last final event - "
                                   "first publish/submit start)",
            "latency": "final event's `at` - publish/submit start (same machine clock)",
            "latency_observed": "raw only: when the producer read the done event back - "
                                "publish start"},
        "reference_not_measured_here": dict(REFERENCE),
    }
    report["problems"] = problems_of(report)
    report["ok"] = not report["problems"]
    return report


# -- output ------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(report: dict[str, Any], stamp: str) -> str:
    o, m = report["options"], report["machine"]
    raw, jf = report["raw"], report["jetflow"]
    jf_run, jf_lat = jf["throughput"]["run"], jf["latency"]["run"]
    ph = jf_run["phases"]
    load = " ".join(f"{x:.2f}" for x in m["loadavg_start"])
    head = f"{'':38}{'jobs/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    lines = [
        f"jetflow throughput benchmark - {stamp}",
        f"machine: nproc {m['nproc']}, Python {m['python']}, {m['nats_server']}, "
        f"nats-py {m['nats_py']}, load avg at start {load}, commit {m['git_commit']}",
        f"throughput: {o['jobs']:,} jobs; latency: {round(o['rate'] * o['seconds']):,} jobs "
        f"at {o['rate']:g}/s; jetflow: {o['workers']} worker(s) x concurrency "
        f"{o['concurrency']}, projector {'on' if o['with_projector'] else 'off'}, "
        f"{o['in_flight']} submits in flight",
        "", head,
        row("raw JetStream round trip (floor)", raw["throughput"]["jobs_per_s"],
            raw["latency"]["latency"]),
        row(f"jetflow echo ({o['workers']} workers x {o['concurrency']})",
            jf_run["jobs_per_s"], jf_lat["latency"]),
        f"{'ratio jetflow/raw':38}{fmt(report['ratio_jetflow_over_raw'], 2):>9}",
        "",
        "jobs/s = jobs / (last final event's `at` - first publish/submit start); latency = "
        "final event's `at` - publish/submit start",
        f"raw latency to the done event read back by the producer: "
        f"p50 {fmt(raw['latency']['latency_observed'].get('p50_ms'))} ms, "
        f"p99 {fmt(raw['latency']['latency_observed'].get('p99_ms'))} ms",
        f"as seen by the client (last final event read back): raw "
        f"{fmt(raw['throughput']['jobs_per_s_observed'], 0)} jobs/s, jetflow "
        f"{fmt(jf_run['jobs_per_s_observed'], 0)} jobs/s; jetflow submits accepted "
        f"{fmt(jf_run['submits_per_s'], 0)}/s",
        f"jetflow while the {jf_run['jobs']:,} submissions came in "
        f"({fmt(ph['submitting_s'])} s): {ph['finished_while_submitting']:,} finished "
        f"({fmt(ph['jobs_per_s_while_submitting'], 0)} jobs/s); after: "
        f"{fmt(ph['jobs_per_s_after_submits'], 0)} jobs/s",
        f"jetflow outcomes: throughput {jf_run['succeeded']:,}/{jf_run['jobs']:,} succeeded, "
        f"latency {jf_lat['succeeded']:,}/{jf_lat['jobs']:,} succeeded; lost "
        f"{jf_run['lost'] + jf_lat['lost']}",
        "",
        "reference, not measured here (from the issue):",
        *(f"  {name:40}{value:>20}" for name, value in REFERENCE),
    ]
    return "\n".join(lines)


def row(name: str, jobs_per_s: float | None, latency: dict[str, Any]) -> str:
    cells = [fmt(jobs_per_s, 0), *(fmt(latency.get(k)) for k in
                                   ("p50_ms", "p90_ms", "p99_ms", "max_ms"))]
    return f"{name:38}" + "".join(f"{c:>9}" for c in cells)


def save_result(name: str, report: dict[str, Any], stamp: str | None = None) -> Path:
    """Write ``bench/results/<name>-<UTC stamp>.json``; the path written."""
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return path


def write_json(report: dict[str, Any], stamp: str) -> Path:
    return save_result("throughput", report, stamp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_consumer:
        asyncio.run(raw_consumer(args.raw_consumer))
        return 0
    opts = options_from(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="jetflow-bench-"))
    keep = False
    try:
        report = asyncio.run(stoppable(run(opts, workdir)))
        keep = not report["ok"]
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process was stopped", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            print(f"data and service logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["timestamp"] = stamp
    return finish(report, stamp)


async def stoppable(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """``work``, cancelled (so that everything is shut down) on SIGTERM as on Ctrl-C."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await work


def finish(report: dict[str, Any], stamp: str) -> int:
    path = write_json(report, stamp)
    print(table(report, stamp))
    print(f"\nresults: {path.relative_to(REPO)}")
    if report["problems"]:
        print("\nFAILED - the run is not valid:", *report["problems"], sep="\n  ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
