"""CSV -> Parquet through a plugin job against the same conversion done directly, on the
same file in one run:

::

    .venv/bin/python -m bench.plugins             # a 1 GB CSV (~3-5 minutes)
    .venv/bin/python -m bench.plugins --mb 100    # smaller

1. **direct**: ``pyarrow.csv.open_csv`` (the example plugin's read options) streamed into
   ``pyarrow.parquet.ParquetWriter`` (zstd), in this process: MB of CSV per second, and
   this process's peak RSS.
2. **jetflow**: ``jetflow up`` (its defaults, 2 workers), ``jetflow plugin deploy
   examples/plugins/csv_to_parquet.py``, one job on the same file, submit -> succeeded:
   MB/s, and the peak RSS of a worker plus its largest child (the one running the job),
   sampled every 50 ms.

3. **deploy -> first job**: a plugin with REQUIREMENTS (a wheel built here, offline, so
   the figure is the environment's build and the routing, not a download) deployed, a job
   submitted at once: the seconds until that job's ``started`` (its environment built by
   every worker and ``env_ready`` recorded first) and until it succeeded.

The ratio jetflow / direct is the figure (the issue's goal: at least 0.8, with the
worker and child under 500 MB together). Writes ``bench/results/plugins-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq

from bench.system import jetflow_up, say, write_results
from bench.throughput import machine_info
from jetflow.adapters.plugins import PluginStore

__all__ = ["main"]

PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "plugins" / "csv_to_parquet.py"
COLUMNS = ("order_id", "customer", "amount", "day")


def make_csv(path: Path, mb: int) -> int:
    """A CSV of orders of about ``mb`` MB; its size in bytes."""
    block = "".join(f"{i},customer-{i % 9973},{(i % 100000) / 100},2026-12-0{1 + i % 9}\n"
                    for i in range(100_000))
    with path.open("w") as f:
        f.write(",".join(COLUMNS) + "\n")
        while f.tell() < mb * 1_000_000:
            f.write(block)
    return path.stat().st_size


def direct(csv: Path, out: Path) -> dict[str, Any]:
    text = {c: pa.string() for c in COLUMNS}
    types = {"order_id": pa.int64(), "customer": pa.string(), "amount": pa.float64(),
             "day": pa.date32()}
    t0 = time.perf_counter()
    reader = pv.open_csv(csv, read_options=pv.ReadOptions(block_size=4 << 20),
                         convert_options=pv.ConvertOptions(column_types=text,
                                                           strings_can_be_null=True))
    writer: pq.ParquetWriter | None = None
    rows = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        table = pa.table({c: table.column(c).cast(types[c]) for c in COLUMNS})
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=128 * 1024)
        rows += table.num_rows
    assert writer is not None
    writer.close()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "rows": rows,
            "mb_s": round(csv.stat().st_size / 1e6 / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_of_workers(up_pid: int) -> float:
    """The largest, over the workers under ``up``, of a worker's RSS plus its largest
    child's (the one running the job): what the issue bounds (MB)."""
    parents: dict[int, int] = {}
    cmds: dict[int, bytes] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmds[pid] = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
    workers = [p for p, c in cmds.items() if parents.get(p) == up_pid and b"\0worker\0" in c]
    best = 0.0
    for w in workers:
        children = [_rss_mb(p) for p, pp in parents.items() if pp == w]
        best = max(best, _rss_mb(w) + max(children, default=0.0))
    return best


async def through_jetflow(csv: Path, workdir: Path) -> dict[str, Any]:
    up = await jetflow_up(workdir, 2, handlers=None)
    try:
        client = await up.client("admin")
        try:
            await PluginStore(client.nc).deploy(PLUGIN, by="bench")
            peak = 0.0
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, _rss_of_workers(up.proc.pid))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            t0 = time.perf_counter()
            job_id = await client.submit("csv_to_parquet", {}, input=str(csv),
                                         output=str(workdir / "out"), timeout_s=3600)
            job = await client.wait(job_id, timeout=3600)
            seconds = time.perf_counter() - t0
            done.set()
            await sampler
            if job.state != "succeeded":
                raise RuntimeError(f"the plugin job ended {job.state}: {job.error}")
            rows = sum(o["rows"] for o in job.result["outputs"] if o["name"] == "orders")
            return {"seconds": round(seconds, 2), "rows": rows,
                    "mb_s": round(csv.stat().st_size / 1e6 / seconds, 1),
                    "peak_rss_worker_and_child_mb": round(peak)}
        finally:
            await client.close()
    finally:
        await up.stop()


def local_wheel(tmp: Path, name: str, value: int) -> Path:
    """A wheel built here, offline (``name`` with ``VALUE = value``): a requirement a
    plugin's environment can install with no network."""
    pkg = tmp / f"src-{name}"
    (pkg / name).mkdir(parents=True, exist_ok=True)
    (pkg / name / "__init__.py").write_text(f"VALUE = {value}\n")
    (pkg / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "1.0"\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    out = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "--no-index", "-q", "-w", str(out), str(pkg)], check=True)
    return next(out.glob(f"{name}-1.0-*.whl"))


async def deploy_to_first_job(workdir: Path) -> dict[str, Any]:
    """Seconds from ``plugin deploy`` of a plugin with REQUIREMENTS to its first job
    running (``started``) and succeeded, the job submitted right after the deploy."""
    wheel = local_wheel(workdir, "jf_bench_req", 1)
    plugin = workdir / "with_reqs.py"
    plugin.write_text(f"NAME = 'with_reqs'\nVERSION = '1'\n"
                      f"REQUIREMENTS = ['jf_bench_req @ {wheel.as_uri()}']\n"
                      "import pyarrow as pa\n"
                      "def parse(path):\n    import jf_bench_req\n"
                      "    return pa.table({'v': [jf_bench_req.VALUE]})\n")
    (workdir / "reqs").mkdir()
    up = await jetflow_up(workdir / "reqs", 2, handlers=None)
    try:
        client = await up.client("admin")
        try:
            t0 = time.time()  # the events' clock (one machine)
            await PluginStore(client.nc).deploy(plugin, by="bench")
            job_id = await client.submit("with_reqs", {}, input=str(plugin))
            job = await client.wait(job_id, timeout=600)
            if job.state != "succeeded":
                raise RuntimeError(f"the plugin job ended {job.state}: {job.error}")
            at = {e.type: e.at for e in await client.history(job_id)}
            return {"deploy_to_started_s": round(at["started"] - t0, 2),
                    "deploy_to_succeeded_s": round(at["succeeded"] - t0, 2)}
        finally:
            await client.close()
    finally:
        await up.stop()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    csv = workdir / "orders.csv"
    say(f"writing a {args.mb} MB CSV")
    size = make_csv(csv, args.mb)
    say("direct: pyarrow.csv -> pyarrow.parquet")
    d = direct(csv, workdir / "direct.parquet")
    say("jetflow: a plugin job under jetflow up")
    j = await through_jetflow(csv, workdir)
    assert j["rows"] == d["rows"], (j, d)
    say("deploy -> first job of a plugin with requirements")
    first = await deploy_to_first_job(workdir)
    return {"machine": machine_info(), "csv_bytes": size, "direct": d, "jetflow": j,
            "ratio": round(j["mb_s"] / d["mb_s"], 2), "requirements": first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plugins", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1000, help="CSV size in MB (1000)")
    args = p.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="jetflow-bench-plugins-") as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    report["stamp"] = stamp
    d, j = report["direct"], report["jetflow"]
    print("| path | MB/s of CSV | seconds | peak RSS MB |\n|---|---|---|---|")
    print(f"| direct pyarrow | {d['mb_s']} | {d['seconds']} | {d['peak_rss_mb']} (this "
          "process) |")
    print(f"| jetflow plugin job | {j['mb_s']} | {j['seconds']} | "
          f"{j['peak_rss_worker_and_child_mb']} (worker + child) |")
    print(f"\njetflow / direct: {report['ratio']}")
    first = report["requirements"]
    print(f"plugin with requirements: deploy -> first job started "
          f"{first['deploy_to_started_s']} s, succeeded {first['deploy_to_succeeded_s']} s")
    print(f"written: {write_results('plugins', stamp, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
