"""Plugin jobs end to end: deployed plugins run by the workers `jetflow up` starts,
input file -> Arrow -> Parquet under the schema contract, lineage, quarantine, the
outputs in `succeeded`, and every kind of bad input failing with its reason and leaving
no partial output. One stack for the module (nothing here kills it)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import pytest_asyncio

from bench.plugins import local_wheel
from jetflow import Client, SubmissionRejected, connect
from jetflow.adapters.bus import connect as bus_connect
from jetflow.adapters.bus import messages_on, stored_seq
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.plugins import PluginStore
from jetflow.core.job import JobState
from jetflow.up import Stack
from jetflow.workers.worker import Worker
from tests.test_projections_e2e import cli

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugins" / "csv_to_parquet.py"


class World:
    def __init__(self, url: str, client: Client, tmp: Path, outputs: Path) -> None:
        self.url, self.client, self.tmp, self.outputs = url, client, tmp, outputs

    async def deploy(self, name: str, body: str, version: str = "1") -> str:
        path = self.tmp / f"{name}-{version}.py"
        path.write_text(f"NAME = {name!r}\nVERSION = {version!r}\n{body}")
        nc = await bus_connect(self.url)
        try:
            return str((await PluginStore(nc).deploy(path, by="test"))["version"])
        finally:
            await nc.close()

    async def run(self, name: str, input: Path | str, args: dict[str, Any] | None = None,
                  output: Path | None = None) -> JobState:
        job_id = await self.client.submit(name, args or {}, input=str(input),
                                          output=str(output) if output else None)
        return await self.client.wait(job_id, timeout=60)

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        return await cli(self.url, *argv, cwd=self.tmp)

    async def envs_of(self, name: str, version: str = "1") -> dict[str, str]:
        """The version's environments as the log says (waiting for the first one)."""
        nc = await bus_connect(self.url)
        try:
            for _ in range(100):
                envs = (await PluginStore(nc).registry(name)).versions[name][version].envs
                if envs:
                    return envs
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        return {}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("plugins")
    async with EmbeddedServer(tmp / "srv", port=0) as srv:
        stack = Stack(data_dir=tmp / "stack", nats_url=srv.url, workers=1, projector=False,
                      lease_s=5.0)
        await stack.start()
        client = await connect(srv.url)
        try:
            yield World(srv.url, client, tmp, tmp / "stack" / "outputs")
        finally:
            await client.close()
            await stack.stop()


def orders(path: Path, rows: int, bad: int = 0) -> Path:
    lines = ["order_id,customer,amount,day"]
    lines += [f"{i},c{i % 7},{i * 0.5},2026-12-0{1 + i % 9}" for i in range(rows)]
    lines += [f"bad{i},c,1.0,2026-12-01" for i in range(bad)]
    path.write_text("\n".join(lines) + "\n")
    return path


def parquet_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.parquet")) if directory.exists() else []


async def test_the_example_converts_a_csv_with_its_contract(world: World) -> None:
    code, out, err = await world.cli("plugin", "deploy", str(EXAMPLE))
    assert code == 0, err
    csv = orders(world.tmp / "orders.csv", 5000, bad=3)
    code, out, err = await world.cli("submit", "csv_to_parquet", "--input", "orders.csv",
                                     "--args", '{"min_amount": 1}', "--wait", "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["state"] == "succeeded"
    outputs = {o["name"]: o for o in doc["result"]["outputs"]}
    main, quarantine = outputs["orders"], outputs["orders_quarantine"]
    assert main["rows"] == 4998 and main["quarantined"] == 3 and quarantine["rows"] == 3
    path = Path(main["uri"].removeprefix("file://"))
    assert path == world.outputs / "csv_to_parquet" / "orders" / f"{doc['job_id']}-1.parquet"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == main["sha256"]
    assert path.stat().st_size == main["bytes"]
    table = pq.read_table(path)
    assert table.schema.field("order_id").type == "int64"
    assert not table.schema.field("order_id").nullable
    assert str(table.schema.field("day").type) == "date32[day]"
    assert set(table.column("_jf_job_id").to_pylist()) == {doc["job_id"]}
    assert set(table.column("_jf_plugin_version").to_pylist()) == {"1.0.0"}
    assert min(table.column("amount").to_pylist()) >= 1
    bad = pq.read_table(Path(quarantine["uri"].removeprefix("file://"))).to_pylist()
    assert [r["_jf_reason"] for r in bad] == ["order_id: 'bad0' is not int64",
                                              "order_id: 'bad1' is not int64",
                                              "order_id: 'bad2' is not int64"]
    assert not list(world.outputs.rglob("*.tmp"))
    assert csv.exists()
    code, out, _ = await world.cli("job", doc["job_id"])
    assert "output orders: 4998 rows (3 quarantined)" in out
    assert "output orders_quarantine: 3 rows" in out


async def test_named_outputs_and_a_job_pinned_to_its_version(world: World) -> None:
    body = ("import pyarrow as pa\nfrom jetflow import Output\n"
            "def parse(path, ctx):\n"
            "    n = int(open(path).read())\n"
            "    return [Output('nums', pa.table({'n': list(range(n))})),\n"
            "            ('tag', pa.record_batch([pa.array([ctx.args['tag']])], ['t']))]\n")
    assert await world.deploy("multi", body, "1") == "1"
    source = world.tmp / "n.txt"
    source.write_text("7")
    job = await world.run("multi", source, {"tag": "x"}, output=world.tmp / "out")
    assert job.state == "succeeded", job.error
    rows = {o["name"]: o["rows"] for o in job.result["outputs"]}
    assert rows == {"nums": 7, "tag": 1}
    assert len(parquet_files(world.tmp / "out" / "nums")) == 1
    history = await world.client.history(job.job_id)
    assert history[0].data["plugin"]["version"] == "1"
    await world.deploy("multi", body.replace("range(n)", "range(n * 2)"), "2")
    job2 = await world.run("multi", source, {"tag": "y"}, output=world.tmp / "out")
    assert {o["name"]: o["rows"] for o in job2.result["outputs"]} == {"nums": 14, "tag": 1}
    assert (await world.client.history(job2.job_id))[0].data["plugin"]["version"] == "2"
    assert job.result["version"] == "1" and job2.result["version"] == "2"


async def test_no_active_version_and_no_plugin_are_rejected(world: World) -> None:
    await world.deploy("gone", "def parse(path):\n    return None\n")
    nc = await bus_connect(world.url)
    try:
        await PluginStore(nc).retire("gone")
    finally:
        await nc.close()
    with pytest.raises(SubmissionRejected, match="has no active version") as info:
        await world.client.submit("gone", {}, input="/etc/hostname")
    assert info.value.code == "no_active_version"
    with pytest.raises(SubmissionRejected, match="are for plugin jobs") as info:
        await world.client.submit("echo", {}, input="/etc/hostname")
    await world.deploy("needs_input", "def parse(path):\n    return None\n")
    with pytest.raises(SubmissionRejected, match="needs 'input'"):
        await world.client.submit("needs_input", {})


@pytest.mark.parametrize(("name", "body", "message"), [
    ("imports_badly", "import module_that_is_not_there\ndef parse(path):\n    return None\n",
     "failed to import: ModuleNotFoundError"),
    ("raises_halfway",
     "import pyarrow as pa\ndef parse(path):\n"
     "    yield pa.record_batch([pa.array([1, 2])], ['a'])\n"
     "    raise ValueError('broke at row 3')\n", "broke at row 3"),
    ("changes_schema",
     "import pyarrow as pa\ndef parse(path):\n"
     "    yield pa.record_batch([pa.array([1])], ['a'])\n"
     "    yield pa.record_batch([pa.array(['x'])], ['a'])\n",
     "batch 1 has schema (a: string), the first had (a: int64)"),
    ("mostly_bad",
     "import pyarrow as pa\nOUTPUTS = {'out': [{'name': 'a', 'type': 'int64', "
     "'nullable': False}]}\ndef parse(path):\n"
     "    return pa.table({'a': ['1', 'x', 'y', None]})\n",
     "3 of 4 rows broke its contract, over the 10% allowed"),
    ("not_a_table", "def parse(path):\n    return 42\n", "parse returned a int"),
])
async def test_bad_plugins_fail_with_the_reason_and_leave_nothing(
        world: World, name: str, body: str, message: str) -> None:
    await world.deploy(name, body)
    source = world.tmp / "any.txt"
    source.write_text("x")
    job = await world.run(name, source, output=world.tmp / f"out-{name}")
    assert job.state == "dead_lettered" and job.error is not None
    assert message in job.error["message"], job.error
    if name != "raises_halfway":
        assert job.attempt == 1 and job.error["retryable"] is False
    assert parquet_files(world.tmp / f"out-{name}") == []
    assert not list((world.tmp / f"out-{name}").rglob("*.tmp"))
    await world.deploy("survivor", "import pyarrow as pa\n"
                       "def parse(path):\n    return pa.table({'x': [1]})\n")
    ok = await world.run("survivor", source)
    assert ok.state == "succeeded", ok.error  # the worker survived


async def test_a_missing_input_fails_permanently(world: World) -> None:
    await world.deploy("reads_text", "def parse(path):\n    return open(path).read()\n")
    job = await world.run("reads_text", world.tmp / "no-such.csv")
    assert job.state == "dead_lettered" and job.attempt == 1
    assert "is missing or unreadable" in job.error["message"]  # type: ignore[index]


async def test_progress_becomes_events_in_the_history(world: World) -> None:
    body = ("import time\nimport pyarrow as pa\n"
            "def parse(path, ctx):\n"
            "    for i in range(1, 11):\n"
            "        ctx.progress(i, 10)\n"
            "        time.sleep(0.1)\n"
            "        yield pa.record_batch([pa.array([i])], ['i'])\n")
    await world.deploy("slowly", body)
    source = world.tmp / "s.txt"
    source.write_text("x")
    job = await world.run("slowly", source)
    assert job.state == "succeeded", job.error
    progress = [e for e in await world.client.history(job.job_id) if e.type == "progress"]
    assert 2 <= len(progress) <= 10
    assert progress[-1].data["done"] == 10 and progress[-1].data["total"] == 10
    assert [e.data["done"] for e in progress] == sorted(e.data["done"] for e in progress)


async def test_logs_prints_and_follows_a_jobs_lines_and_progress(world: World) -> None:
    body = ("import sys, time\nimport pyarrow as pa\n"
            "def parse(path, ctx):\n"
            "    for i in range(1, 6):\n"
            "        print(f'line {i}')\n"
            "        ctx.progress(i, 5)\n"
            "        time.sleep(0.3)\n"
            "    print('to stderr', file=sys.stderr)\n"
            "    return pa.table({'i': [1]})\n")
    await world.deploy("chatty", body)
    source = world.tmp / "c.txt"
    source.write_text("x")
    job_id = await world.client.submit("chatty", {}, input=str(source))
    code, out, err = await world.cli("logs", job_id, "-f")
    assert code == 0, err
    lines = out.splitlines()
    assert [ln for ln in lines if ln.startswith("[1 stdout]")] == [
        f"[1 stdout] line {i}" for i in range(1, 6)]
    assert "[1 stderr] to stderr" in lines
    assert "[1 progress] 5/5" in lines and lines[-1] == f"job {job_id} succeeded (attempt 1)"
    code, out, _ = await world.cli("logs", job_id, "--json")
    first = json.loads(out.splitlines()[0])
    assert first == {"attempt": 1, "stream": "stdout", "line": "line 1"}
    code, out, err = await world.cli("logs", "nosuchjob")
    assert code == 1 and "no job 'nosuchjob'" in err


async def test_a_flood_of_lines_is_capped_and_said(world: World) -> None:
    body = ("import pyarrow as pa\n"
            "def parse(path, ctx):\n"
            "    for i in range(30000):\n"
            "        print(f'flood {i}')\n"
            "    return pa.table({'i': [1]})\n")
    await world.deploy("flood", body)
    source = world.tmp / "f.txt"
    source.write_text("x")
    job = await world.run("flood", source)
    assert job.state == "succeeded", job.error
    code, out, err = await world.cli("logs", job.job_id, "--json")
    lines = [json.loads(ln) for ln in out.splitlines()]
    kept = [ln for ln in lines if ln["stream"] == "stdout"]
    notes = [ln["line"] for ln in lines if ln["stream"] == "jetflow"]
    assert len(notes) == 1 and "dropped" in notes[0]
    dropped = int(notes[0].split()[1])
    assert dropped > 0 and len(kept) + dropped == 30000
    assert [ln["line"] for ln in kept[:3]] == ["flood 0", "flood 1", "flood 2"]


async def test_requirements_run_in_an_environment_of_their_own(world: World) -> None:
    wheel = local_wheel(world.tmp, "jf_req_demo", 41)
    body = (f"REQUIREMENTS = ['jf_req_demo @ {wheel.as_uri()}']\n"
            "import pyarrow as pa\n"
            "def parse(path):\n"
            "    import sys, jf_req_demo\n"
            "    return pa.table({'v': [jf_req_demo.VALUE + 1], 'py': [sys.prefix]})\n")
    await world.deploy("with_reqs", body)
    await world.deploy("same_reqs", body.replace("+ 1", "+ 2"))
    source = world.tmp / "r.txt"
    source.write_text("x")
    first = await world.run("with_reqs", source, output=world.tmp / "out-reqs")
    assert first.state == "succeeded", first.error
    second = await world.run("same_reqs", source, output=world.tmp / "out-reqs")
    assert second.state == "succeeded", second.error
    rows = [pq.read_table(Path(j.result["outputs"][0]["uri"].removeprefix("file://")))
            .to_pylist()[0] for j in (first, second)]
    assert [r["v"] for r in rows] == [42, 43]
    envs = world.tmp / "stack" / "envs"
    assert rows[0]["py"] == rows[1]["py"] and rows[0]["py"].startswith(str(envs))
    assert len([p for p in envs.iterdir() if not p.name.startswith(".")]) == 1  # shared
    with pytest.raises(ModuleNotFoundError):
        __import__("jf_req_demo")  # installed in the plugin's environment, not the worker's
    # built when deployed, by the worker, and said in the log
    assert list((await world.envs_of("with_reqs")).values()) == ["ready"]
    # the sentinel offered the job only once its worker had said its environment is ready
    nc = await bus_connect(world.url)
    try:
        ready = [(stored_seq(m), json.loads(m.data)["data"]["worker"])
                 for m in await messages_on(nc.jetstream(), ["jf.plugin.with_reqs.env_ready"])]
    finally:
        await nc.close()
    started = next(e for e in await world.client.history(first.job_id) if e.type == "started")
    assert any(seq < started.seq and worker == started.data["worker"]
               for seq, worker in ready), (ready, started)
    code, out, _ = await world.cli("plugin", "list")
    assert "1 ready" in out


async def test_a_requirement_that_cannot_install_fails_permanently(world: World) -> None:
    body = (f"REQUIREMENTS = ['nothere @ {(world.tmp / 'no-such.whl').as_uri()}']\n"
            "def parse(path):\n    return None\n")
    await world.deploy("bad_reqs", body)
    source = world.tmp / "r.txt"
    source.write_text("x")
    job = await world.run("bad_reqs", source)
    assert job.state == "dead_lettered" and job.attempt == 1
    assert "installing nothere @ file://" in job.error["message"]  # type: ignore[index]
    assert "failed" in job.error["message"]  # type: ignore[index]
    envs = await world.envs_of("bad_reqs")
    assert [v.startswith("installing nothere") for v in envs.values()] == [True]


async def test_a_worker_serves_only_the_plugins_it_names(world: World) -> None:
    body = "import pyarrow as pa\ndef parse(path):\n    return pa.table({'x': [1, 2]})\n"
    await world.deploy("picky_a", body)
    await world.deploy("picky_b", body)
    worker = await Worker(world.url, handlers={}, queues=("picky",), plugins="picky_a",
                          data_dir=world.tmp / "picky", concurrency=1).start()
    try:
        source = world.tmp / "picky.txt"
        source.write_text("x")
        b = await world.client.submit("picky_b", {}, input=str(source), queue="picky")
        a = await world.client.submit("picky_a", {}, input=str(source), queue="picky")
        job = await world.client.wait(a, timeout=60)
        assert job.state == "succeeded" and job.worker == worker.worker_id, job.error
        await asyncio.sleep(1.0)
        assert (await world.client.status(b)).state == "queued"  # nobody serves picky_b
        await world.client.cancel(b)
    finally:
        await worker.drain()
