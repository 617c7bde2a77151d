"""Replay rate and live lag of the projections, with the raw fetch floor, in one run.

::

    .venv/bin/python -m bench.replay                            # 1,000,000 events, 60 s live
    .venv/bin/python -m bench.replay --events 100000 --seconds 10   # a quick run

Each phase runs against an embedded nats-server (the project's nats.conf) in a temporary
directory:

1. **log** - ``--events`` synthetic but valid events (:mod:`jetflow.projections.synthetic`: many
   jobs in flight, retries, dead letters, rejections, the headers real appends carry) are
   appended to JF_EVENTS, pipelined.
2. **raw floor** - the same events merely fetched, by the reader the projector uses
   (:class:`jetflow.adapters.reader.StreamReader`, turning each message into the projection's
   input) and by :class:`jetflow.adapters.bus.Tail`; each in a child process, like the replay.
3. **replay** - ``jetflow replay``'s :func:`jetflow.projections.replay.rebuild` of the whole log
   into a new SQLite file, in a child process whose RSS (with its own reading child's,
   :mod:`jetflow.projections.fetcher`) is sampled every 0.2 s.
4. **live lag** - a fresh server, the real ``jetflow projector`` process, and ``--rate``
   events/s appended for ``--seconds``; every 0.1 s the lag is measured as the age of the
   oldest appended event the projection's checkpoint has not reached (0 when caught up),
   and as a count (stream head - checkpoint).

Prints a table and writes ``bench/results/replay-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jetflow.adapters.bus import Publisher, Tail, connect, ensure_streams
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.reader import StreamReader
from jetflow.adapters.runtime import loop_name, run
from jetflow.core import subjects as S
from jetflow.core.codec import encode_event
from jetflow.core.metadata import parse_ack_reply
from jetflow.projections.replay import rebuild
from jetflow.projections.synthetic import Appended, publish_log, synthetic_log

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
TARGET_RATE = 50_000
TARGET_LAG_S = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    p.add_argument("--batch", type=int, default=5000, help="replay batch (events/txn)")
    p.add_argument("--rate", type=int, default=2000, help="live events per second")
    p.add_argument("--seconds", type=float, default=60.0, help="live phase duration")
    p.add_argument("--no-tail", action="store_true", help="skip the bus.Tail floor")
    p.add_argument("--child", nargs=3, metavar=("MODE", "URL", "ARG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- child processes: one measurement each, JSON on stdout -----------------------------------

async def child(mode: str, url: str, arg: str) -> dict[str, Any]:
    nc = await connect(url, name=f"bench-{mode}")
    head = int((await nc.jetstream().stream_info(S.EVENTS_STREAM)).state.last_seq)
    started = time.perf_counter()
    try:
        if mode == "replay":
            result = await rebuild(nc, Path(arg), batch=int(os.environ["BENCH_BATCH"]))
            events = result.events
        elif mode == "reader":
            events = await _drain_reader(nc, head)
        else:
            events = await _drain_tail(nc, head)
    finally:
        await nc.close()
    seconds = time.perf_counter() - started
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds}


async def _drain_reader(nc: Any, head: int) -> int:
    reader = StreamReader(nc, S.EVENTS_STREAM, batch=5000, idle_s=0.5)
    events = 0
    try:
        async for msgs in reader.batches():
            events += len(msgs)  # already the projector's input (jetflow.core.metadata.Stored)
            if reader.next_seq > head:
                return events
    finally:
        await reader.close()
    return events


async def _drain_tail(nc: Any, head: int) -> int:
    tail = Tail(nc.jetstream(), S.EVENTS_STREAM, batch=5000, idle_s=0.5)
    events = 0
    try:
        async for msgs in tail.batches():
            events += len([parse_ack_reply(m.reply).stream_seq for m in msgs])
            if tail.next_seq > head:
                return events
    finally:
        await tail.close()
    return events


def run_child(mode: str, url: str, arg: str, batch: int) -> dict[str, Any]:
    """Run one measurement in a child process, sampling its RSS."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.replay", "--child", mode, url, arg], cwd=REPO,
        stdout=subprocess.PIPE, env={**os.environ, "BENCH_BATCH": str(batch)})
    samples: list[float] = []
    while proc.poll() is None:
        samples.append(_rss_mb(proc.pid))
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else b""
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    samples = [s for s in samples if s > 0]
    result["peak_rss_mb"] = max(samples, default=0.0)
    result["rss_mb_by_decile"] = [samples[min(len(samples) - 1, i * len(samples) // 10)]
                                  for i in range(11)] if samples else []
    return result


def _rss_mb(pid: int) -> float:
    """The resident memory of ``pid`` and all its descendants (the replay's reading child
    included), in MiB."""
    total = 0.0
    for proc in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


# -- phases ------------------------------------------------------------------------------------

async def append_log(url: str, events: int) -> dict[str, Any]:
    nc = await connect(url, name="bench-append")
    try:
        await ensure_streams(nc.jetstream())
        started = time.perf_counter()
        count = await publish_log(nc, synthetic_log(events, seed=7))
        seconds = time.perf_counter() - started
    finally:
        await nc.close()
    return {"events": count, "seconds": seconds, "events_per_s": count / seconds}


async def live_lag(url: str, db: Path, log_dir: Path, rate: int, seconds: float
                   ) -> dict[str, Any]:
    """The real projector process while ``rate`` events/s are appended."""
    from jetflow.up import Service

    nc = await connect(url, name="bench-live")
    await ensure_streams(nc.jetstream())
    projector = await Service("projector", ["projector", "--db", str(db)], url,
                              log_dir).start()
    try:
        await _wait_for_file(db)
        appended: dict[int, float] = {}
        sampler = asyncio.create_task(_sample_lag(db, appended))
        sent = await _append_at_rate(nc, appended, rate, seconds)
        await asyncio.sleep(2.0)  # let the last events in
        sampler.cancel()
        lags = await asyncio.gather(sampler, return_exceptions=True)
    finally:
        await projector.stop()
        await nc.close()
    samples: list[tuple[float, int]] = lags[0] if isinstance(lags[0], list) else []
    return _lag_summary(samples, sent, rate, seconds)


async def _wait_for_file(db: Path) -> None:
    for _ in range(100):
        if _checkpoint(db) is not None:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the projector did not create {db}")


def _checkpoint(db: Path) -> int | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=1.0)) as con:
            return int(con.execute("SELECT last_seq FROM checkpoint").fetchone()[0])
    except (sqlite3.Error, TypeError):
        return None


async def _append_at_rate(nc: Any, appended: dict[int, float], rate: int,
                          seconds: float) -> int:
    publisher = Publisher(nc, max_in_flight=4096)
    log: Iterator[Appended] = synthetic_log(int(rate * seconds) + 10, seed=11)
    tick = 0.01
    started = time.monotonic()
    sent = 0
    pending: list[asyncio.Future[Any]] = []
    while (elapsed := time.monotonic() - started) < seconds:
        for _ in range(int(elapsed * rate) - sent):
            event, headers = next(log)
            fut = await publisher.publish(S.event_subject(event.kind, event.id, event.type),
                                          encode_event(event), headers)
            fut.add_done_callback(functools.partial(_record, appended, sent_at=time.time()))
            pending.append(fut)
            sent += 1
        await asyncio.sleep(tick - (time.monotonic() - started) % tick)
    await asyncio.gather(*pending)
    return sent


def _record(appended: dict[int, float], fut: asyncio.Future[Any], *, sent_at: float) -> None:
    if not fut.exception():
        appended[fut.result().seq] = sent_at


async def _sample_lag(db: Path, appended: dict[int, float]) -> list[tuple[float, int]]:
    """(age of the oldest unapplied event in s, head - checkpoint) every 0.1 s."""
    samples: list[tuple[float, int]] = []
    try:
        while True:
            await asyncio.sleep(0.1)
            done = await asyncio.to_thread(_checkpoint, db)
            if done is None or not appended:
                continue
            head = max(appended)
            oldest = appended.get(done + 1)
            age = time.time() - oldest if oldest is not None and done < head else 0.0
            samples.append((max(age, 0.0), head - done))
    except asyncio.CancelledError:
        return samples


def _lag_summary(samples: list[tuple[float, int]], sent: int, rate: int,
                 seconds: float) -> dict[str, Any]:
    ages = sorted(a for a, _n in samples)
    counts = sorted(n for _a, n in samples)

    def p(values: list[Any], q: float) -> Any:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"rate": rate, "seconds": seconds, "appended": sent, "samples": len(samples),
            "lag_s_max": ages[-1] if ages else None, "lag_s_p99": p(ages, 0.99),
            "lag_s_p50": p(ages, 0.5), "lag_events_max": counts[-1] if counts else None,
            "lag_events_p99": p(counts, 0.99)}


# -- the run -------------------------------------------------------------------------------------

async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with EmbeddedServer(tmp / "log-server", port=0) as server:
        say(f"appending {args.events:,} synthetic events ...")
        results["append"] = await append_log(server.url, args.events)
        say(f"  {results['append']['events_per_s']:,.0f} events/s")
        say("raw floor: fetching them with the projector's reader ...")
        results["floor_reader"] = run_child("reader", server.url, "-", args.batch)
        say(f"  {results['floor_reader']['events_per_s']:,.0f} events/s")
        if not args.no_tail:
            say("raw floor: fetching them with jetflow.adapters.bus.Tail ...")
            results["floor_tail"] = run_child("tail", server.url, "-", args.batch)
            say(f"  {results['floor_tail']['events_per_s']:,.0f} events/s")
        say("replay: rebuilding a projection from seq 1 ...")
        results["replay"] = run_child("replay", server.url, str(tmp / "replay.sqlite"),
                                      args.batch)
        say(f"  {results['replay']['events_per_s']:,.0f} events/s, peak RSS "
            f"{results['replay']['peak_rss_mb']:.0f} MB")
    async with EmbeddedServer(tmp / "live-server", port=0) as server:
        say(f"live: {args.rate} events/s for {args.seconds:g}s into the projector process ...")
        results["live"] = await live_lag(server.url, tmp / "live.sqlite", tmp / "logs",
                                         args.rate, args.seconds)
    return results


def say(text: str) -> None:
    print(text, flush=True)


def report(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    replay, floor, live = results["replay"], results["floor_reader"], results["live"]
    summary = {
        "replay_events_per_s": round(replay["events_per_s"]),
        "floor_reader_events_per_s": round(floor["events_per_s"]),
        "floor_tail_events_per_s": round(results["floor_tail"]["events_per_s"])
        if "floor_tail" in results else None,
        "replay_to_floor_ratio": round(replay["events_per_s"] / floor["events_per_s"], 3),
        "replay_peak_rss_mb": round(replay["peak_rss_mb"], 1),
        "live_lag_s_max": live["lag_s_max"], "live_lag_s_p99": live["lag_s_p99"],
        "meets_replay_target": replay["events_per_s"] >= TARGET_RATE,
        "meets_lag_target": live["lag_s_max"] is not None and live["lag_s_max"] < TARGET_LAG_S,
    }
    rows = [("replay (rebuild from seq 1)", f"{summary['replay_events_per_s']:,} events/s",
             f"target >= {TARGET_RATE:,}"),
            ("raw floor: projector's reader", f"{summary['floor_reader_events_per_s']:,} "
                                               "events/s", ""),
            ("raw floor: jetflow.adapters.bus.Tail", "skipped (--no-tail)" if args.no_tail else
             f"{summary['floor_tail_events_per_s']:,} events/s", ""),
            ("replay / reader floor", f"{summary['replay_to_floor_ratio']:.2f}", ""),
            ("replay peak RSS", f"{summary['replay_peak_rss_mb']:.0f} MB",
             "by decile: " + " ".join(f"{m:.0f}" for m in replay["rss_mb_by_decile"])),
            (f"live lag at {args.rate}/s for {args.seconds:g}s",
             f"max {_s(live['lag_s_max'])}, p99 {_s(live['lag_s_p99'])}",
             f"max {live['lag_events_max']} events; target < {TARGET_LAG_S:g}s")]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<26} {note}")
    return summary


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def write(args: argparse.Namespace, results: dict[str, Any], summary: dict[str, Any]) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"replay-{stamp}.json"
    path.write_text(json.dumps({
        "utc": stamp, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "platform": platform.platform(), "event_loop": loop_name()},
        "options": {k: v for k, v in vars(args).items() if k != "child"},
        "summary": summary, "results": results}, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run(child(*args.child))))
        return 0
    with tempfile.TemporaryDirectory(prefix="jetflow-bench-replay-") as tmp:
        results = run(measure(args, Path(tmp)))
    summary = report(args, results)
    path = write(args, results, summary)
    print(f"\nresults: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
