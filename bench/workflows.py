"""Workflows under ``jetflow up`` (its defaults: 2 workers, projector on, the example
handlers), in one run:

::

    .venv/bin/python -m bench.workflows            # ~1-2 minutes
    .venv/bin/python -m bench.workflows --quick    # a smoke run

1. **fan-out/fan-in**: one workflow of ``--width`` + 2 steps (a root, ``--width``
   independent steps depending on it, a sink depending on all of them): start -> end.
2. **per-step overhead**: ``--chain`` plain jobs of ``wf_succeed`` one after another,
   each from its ``submitted`` to its ``succeeded`` (the log's event times), then one
   linear workflow of ``--chain`` ``wf_succeed`` steps, each from its parent's
   ``succeeded`` to its own; overhead = mean step - mean plain job.
3. **concurrent linear**: ``--concurrent`` workflows of the ``linear`` example started at
   once; workflows/s = n / (last end - first start), and p50/p99 of each one's start ->
   end (the times of its ``started`` and ``succeeded`` events).

Prints a table and writes ``bench/results/workflows-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.system import jetflow_up, say, write_results
from bench.throughput import latency_summary, machine_info
from jetflow import Client

__all__ = ["main"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "workflows"


def fan_template(width: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"name": "root", "handler": "wf_succeed"}]
    steps += [{"name": f"leaf_{i:04d}", "handler": "wf_succeed", "depends_on": ["root"]}
              for i in range(width)]
    steps.append({"name": "sink", "handler": "wf_succeed",
                  "depends_on": [f"leaf_{i:04d}" for i in range(width)]})
    return {"name": f"fan_{width}", "steps": steps}


def chain_template(n: int) -> dict[str, Any]:
    return {"name": f"chain_{n}", "steps": [
        {"name": f"s{i:04d}", "handler": "wf_succeed",
         **({"depends_on": [f"s{i - 1:04d}"]} if i else {})} for i in range(n)]}


async def timed_workflow(client: Client, name: str, context: Any,
                         timeout: float = 600) -> tuple[float, str]:
    t0 = time.perf_counter()
    wf = await client.start_workflow(name, context)
    view = await client.wait_workflow(wf, timeout=timeout)
    if view.state != "succeeded":
        raise RuntimeError(f"{name} {wf} ended {view.state}: {view.reason}")
    return time.perf_counter() - t0, wf


async def fan(client: Client, width: int) -> dict[str, Any]:
    reg = await client.register_workflow(fan_template(width))
    seconds, wf = await timed_workflow(client, str(reg["name"]), {})
    return {"steps": width + 2, "seconds": round(seconds, 3),
            "steps_per_s": round((width + 2) / seconds, 1), "workflow_id": wf}


async def overhead(client: Client, n: int) -> dict[str, Any]:
    """Times from the log's own event times, so neither side counts the client's round
    trips: a plain job's submitted -> succeeded, against a chain step's interval (its
    parent's succeeded -> its succeeded: the sentinel's planning of the next step, its
    submitted, dispatch, run and outcome)."""
    plain = []
    for _ in range(n):
        job_id = await client.submit("wf_succeed", {})
        assert (await client.wait(job_id, timeout=60)).state == "succeeded"
        events = {e.type: e.at for e in await client.history(job_id)}
        plain.append(events["succeeded"] - events["submitted"])
    reg = await client.register_workflow(chain_template(n))
    seconds, wf = await timed_workflow(client, str(reg["name"]), {})
    view = await client.workflow_status(wf)
    ends = [view.started_at or 0.0] + [view.steps[f"s{i:04d}"].finished_at or 0.0
                                       for i in range(n)]
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    per_step, mean_plain = sum(steps) / n, sum(plain) / n
    return {"steps": n, "plain_job_ms": latency_summary(plain),
            "workflow_step_ms": latency_summary(steps),
            "plain_job_mean_ms": round(mean_plain * 1000, 2),
            "workflow_step_mean_ms": round(per_step * 1000, 2),
            "overhead_per_step_ms": round((per_step - mean_plain) * 1000, 2),
            "ratio": round(per_step / mean_plain, 2), "chain_wall_s": round(seconds, 3)}


async def concurrent(client: Client, n: int) -> dict[str, Any]:
    await client.register_workflow(EXAMPLES / "linear.yaml")
    t0 = time.time()
    ids = await asyncio.gather(*(client.start_workflow("linear", {"even_number": 6})
                                 for _ in range(n)))
    views = await asyncio.gather(*(client.wait_workflow(w, timeout=600) for w in ids))
    assert all(v.state == "succeeded" and v.result == 69 for v in views)
    ends = [v.finished_at or 0.0 for v in views]
    spans = [(v.finished_at or 0.0) - (v.started_at or 0.0) for v in views]
    return {"workflows": n, "workflows_per_s": round(n / (max(ends) - t0), 1),
            "start_to_end": latency_summary(spans)}


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    up = await jetflow_up(workdir, 2, handlers=None)
    try:
        client = await up.client("admin")
        try:
            say(f"fan-out/fan-in of {args.width + 2} steps")
            report["fan"] = await fan(client, args.width)
            say(f"per-step overhead over {args.chain} steps")
            report["overhead"] = await overhead(client, args.chain)
            say(f"{args.concurrent} concurrent linear workflows")
            report["concurrent"] = await concurrent(client, args.concurrent)
        finally:
            await client.close()
    finally:
        await up.stop()
    return report


def table(r: dict[str, Any]) -> str:
    f, o, c = r["fan"], r["overhead"], r["concurrent"]
    s = c["start_to_end"]
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| fan-out/fan-in, {f['steps']} steps | {f['seconds']} s ({f['steps_per_s']} "
        "steps/s) |",
        f"| plain job of wf_succeed, submitted -> succeeded | {o['plain_job_mean_ms']} ms |",
        f"| linear workflow step of wf_succeed, parent's succeeded -> succeeded | "
        f"{o['workflow_step_mean_ms']} ms |",
        f"| per-step overhead | {o['overhead_per_step_ms']} ms ({o['ratio']}x) |",
        f"| {c['workflows']} concurrent linear workflows | {c['workflows_per_s']} "
        "workflows/s |",
        f"| ... start -> end p50 / p99 / max | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} / "
        f"{s['max_ms']:.1f} ms |"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workflows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=998, help="fan-out width (998: 1,000 steps)")
    p.add_argument("--chain", type=int, default=200)
    p.add_argument("--concurrent", type=int, default=100)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.chain, args.concurrent = 48, 20, 10
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="jetflow-bench-wf-") as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    report["stamp"] = stamp
    print(table(report))
    print(f"\nwritten: {write_results('workflows', stamp, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
