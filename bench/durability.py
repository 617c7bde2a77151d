"""What the durable profile costs: jetflow jobs/s with the default nats-server settings
and with ``sync_interval: always`` (``jetflow up --durable``), in one run, same machine.

    .venv/bin/python -m bench.durability [--jobs 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from bench.throughput import jetflow_burst, machine_info, save_result, say
from jetflow import connect
from jetflow.up import Stack


async def measure(durable: bool, jobs: int, workdir: Path) -> dict[str, Any]:
    name = "durable" if durable else "default"
    stack = Stack(data_dir=workdir / name, port=0, workers=2, concurrency=8, durable=durable,
                  projector=False)
    async with stack:
        client = await connect(stack.url)
        try:
            await client.watch()
            result = await jetflow_burst(client, jobs, in_flight=200)
        finally:
            await client.close()
    say(f"{name}: {result['jobs_per_s']:,.0f} jobs/s, {result['succeeded']:,}/{jobs:,} "
        "succeeded")
    return result


async def run(jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jf-durability-") as tmp:
        default = await measure(False, jobs, Path(tmp))
        durable = await measure(True, jobs, Path(tmp))
    ratio = durable["jobs_per_s"] / default["jobs_per_s"]
    return {"machine": machine_info(), "jobs": jobs, "default": default, "durable": durable,
            "durable_over_default": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args()
    report = asyncio.run(run(args.jobs))
    path = save_result("durability", report)
    print(f"\njobs/s, {args.jobs:,} echo jobs, 2 workers x 8:")
    print(f"  default profile (fsync every 2 min)   {report['default']['jobs_per_s']:8,.0f}")
    print(f"  --durable (sync_interval: always)     {report['durable']['jobs_per_s']:8,.0f}")
    print(f"  durable / default                     {report['durable_over_default']:8.2f}")
    print(f"results: {path}")
    lost = sum(report[k]["jobs"] - report[k]["succeeded"] for k in ("default", "durable"))
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
