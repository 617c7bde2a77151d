"""`make bench`: what the security of ``jetflow up`` costs, in one run.

::

    .venv/bin/python -m bench.security            # ~2 minutes
    .venv/bin/python -m bench.security --quick    # a smoke run

``jetflow up --workers 2 --handlers echo`` three ways, interleaved over ``--rounds``
rounds so that the machine's drift falls on each alike:

- ``--insecure``: no credentials, no roles, no signatures;
- the default: a role per service enforced by nats-server, every worker event signed and
  checked (``jetflow.core.origin``), anonymous clients submitters;
- ``--tls``: the default over TLS with a generated CA.

Each round publishes ``--jobs`` no-op jobs of 256 bytes back to back on
``jf.submit.default`` as an anonymous client (``nats pub``), done when every
``succeeded`` event was seen. Prints the median jobs/s of each and its ratio to
``--insecure``; writes ``bench/results/security-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.system import burst_pub, jetflow_up, say, write_results
from bench.throughput import machine_info

__all__ = ["main"]

CONFIGS: dict[str, tuple[str, ...]] = {"insecure": ("--insecure",), "secured": (),
                                       "tls": ("--tls",)}


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, flags in CONFIGS.items():
            up = await jetflow_up(workdir, 2, flags=flags)
            try:
                await burst_pub(up, min(500, args.jobs), f"warm-{name}-{round_}")
                result = await burst_pub(up, args.jobs, f"{name}-{round_}")
            finally:
                await up.stop()
            runs[name].append(result["jobs_per_s"])
            say(f"  round {round_ + 1}, {name}: {result['jobs_per_s']:,} jobs/s")
    medians = {name: round(statistics.median(v), 1) for name, v in runs.items()}
    return {"machine": machine_info(), "jobs": args.jobs, "rounds": args.rounds,
            "jobs_per_s": runs, "median_jobs_per_s": medians,
            "ratio_to_insecure": {name: round(m / medians["insecure"], 3)
                                  for name, m in medians.items()}}


def table(report: dict[str, Any]) -> str:
    lines = ["| jetflow up --workers 2 | burst jobs/s, median [min-max] | ratio to --insecure |",
             "|---|---|---|"]
    for name, flags in CONFIGS.items():
        values = report["jobs_per_s"][name]
        lines.append(f"| {' '.join(flags) or '(default: roles + signed events)'} | "
                     f"{report['median_jobs_per_s'][name]:,} [{min(values):,}-"
                     f"{max(values):,}] | {report['ratio_to_insecure'][name]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.security", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.rounds = 500, 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    say(f"security: {args.rounds} rounds of {args.jobs:,} jobs, insecure / secured / tls")
    with tempfile.TemporaryDirectory(prefix="jetflow-bench-security-") as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    report["stamp"] = stamp
    print(table(report))
    print(f"\nwritten: {write_results('security', stamp, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
