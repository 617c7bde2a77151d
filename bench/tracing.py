"""What tracing costs: jetflow jobs/s with tracing off and with every span exported over
OTLP/HTTP, in one run, same machine.

    .venv/bin/python -m bench.tracing [--jobs 3000] [--rounds 2]

Each measurement is a fresh ``Stack`` (embedded nats-server, a sentinel, 2 workers x 8,
no projector) that first runs ``--warmup`` jobs (child processes started and their
imports done: a one-time cost), then ``--jobs`` echo jobs submitted 200 at a time through
``jetflow.adapters.client`` and waited for with ``watch``/``wait_terminal``. "on" exports to a
``jetflow collector`` in its own process (an OTLP/HTTP receiver that decodes every request
and writes each span to a file, roughly what Jaeger's receiver does), with the SDK's
default batching. The rounds alternate off/on so drift on a busy machine hits both.
Writes ``bench/results/tracing-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.throughput import jetflow_burst, machine_info, save_result, say
from jetflow import connect
from jetflow.up import Stack

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_TRACES_EXPORTER", "OTEL_BSP_SCHEDULE_DELAY")


@contextlib.asynccontextmanager
async def collector(spans_file: Path) -> AsyncIterator[dict[str, Any]]:
    """A ``jetflow collector`` process on a free port; yields {"url", "spans"}."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "collector", "--port", "0", "--out",
        str(spans_file), stdout=asyncio.subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 30.0)).decode()
    found = re.search(r"at (http://\S+)", first)
    if found is None:
        proc.kill()
        raise RuntimeError(f"collector did not start: {first!r}")
    info: dict[str, Any] = {"url": found.group(1), "spans": 0}
    try:
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        out = (await asyncio.wait_for(proc.communicate(), 30.0))[0].decode()
        counted = re.search(r"received (\d+) spans", out)
        info["spans"] = int(counted.group(1)) if counted else 0


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Any:
    """Only ``values`` of the OpenTelemetry variables, for the stack started inside."""
    saved = {k: os.environ.pop(k) for k in OTEL_VARS if k in os.environ}
    os.environ.update(values)
    try:
        yield
    finally:
        for k in OTEL_VARS:
            os.environ.pop(k, None)
        os.environ.update(saved)


async def burst(workdir: Path, jobs: int, warmup: int) -> dict[str, Any]:
    stack = Stack(data_dir=workdir, port=0, workers=2, concurrency=8, projector=False)
    async with stack:
        client = await connect(stack.url)
        try:
            await client.watch()
            if warmup:  # every child process started and imported, connections warm
                await jetflow_burst(client, warmup, in_flight=200)
            return await jetflow_burst(client, jobs, in_flight=200)
        finally:
            await client.close()


async def measure(tracing: bool, jobs: int, warmup: int, workdir: Path) -> dict[str, Any]:
    name = "on" if tracing else "off"
    if not tracing:
        with environment({}):
            result = await burst(workdir, jobs, warmup)
    else:
        async with collector(workdir / "spans.jsonl") as got:
            with environment({"OTEL_EXPORTER_OTLP_ENDPOINT": got["url"]}):
                result = await burst(workdir, jobs, warmup)
        result["spans_received"] = got["spans"]  # counted once the collector stopped
    say(f"tracing {name}: {result['jobs_per_s']:,.0f} jobs/s, {result['succeeded']:,}/"
        f"{jobs:,} succeeded" + (f", {result['spans_received']:,} spans exported"
                                 if tracing else ""))
    return result


async def run(jobs: int, rounds: int, warmup: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="jf-tracing-") as tmp:
        for i in range(rounds):
            for tracing in (False, True):
                name = "on" if tracing else "off"
                runs[name].append(await measure(tracing, jobs, warmup,
                                                  Path(tmp) / f"{name}{i}"))
    off = statistics.median(r["jobs_per_s"] for r in runs["off"])
    on = statistics.median(r["jobs_per_s"] for r in runs["on"])
    spans = [r["spans_received"] / (jobs + warmup) for r in runs["on"]]
    return {"machine": machine_info(), "jobs": jobs, "rounds": rounds, "warmup": warmup,
            "setup": {"workers": 2, "concurrency": 8, "submit_in_flight": 200,
                      "exporter": "OTLP/HTTP protobuf to a local jetflow collector",
                      "sdk_batching": "defaults (OTEL_BSP_*)"},
            "off_jobs_per_s": off, "on_jobs_per_s": on, "on_over_off": on / off,
            "spans_per_job": statistics.median(spans), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (2)")
    parser.add_argument("--warmup", type=int, default=300,
                        help="jobs run first on each stack, not measured (300)")
    args = parser.parse_args()
    report = asyncio.run(run(args.jobs, args.rounds, args.warmup))
    path = save_result("tracing", report)
    print(f"\njobs/s, {args.jobs:,} echo jobs, 2 workers x 8, median of {args.rounds}:")
    print(f"  tracing off (no exporter configured)   {report['off_jobs_per_s']:8,.0f}")
    print(f"  tracing on, OTLP/HTTP export           {report['on_jobs_per_s']:8,.0f}"
          f"   ({report['spans_per_job']:.1f} spans per job)")
    print(f"  on / off                               {report['on_over_off']:8.2f}")
    print(f"results: {path}")
    lost = sum(r["jobs"] - r["succeeded"] for rs in report["runs"].values() for r in rs)
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
