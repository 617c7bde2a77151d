"""`make demo`: the whole system, for real, end to end.

Starts nats-server (the venv's binary, nats.conf), a sentinel, two workers and the
projector as separate processes; submits jobs three ways (Python API, the `jetflow` CLI,
a raw NATS publish) and, while they land, starts two example workflows (tasker-core's
linear DAG and a CSV cut into dynamic batches) and a plugin job (the example plugin,
deployed, turns a generated CSV into Parquet under its schema contract); waits for them;
prints each job's final state and event history read from the stream, each workflow's DAG
with its exact result, the plugin's outputs, and the projection's view; shuts everything
down.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from jetflow import Client, connect
from jetflow.adapters.bus import last_violation
from jetflow.cli.render import job_lines
from jetflow.cli.workflow import draw
from jetflow.core import subjects as S
from jetflow.core.job import fold
from jetflow.core.submission import derive_job_id
from jetflow.up import Stack

DATA = Path(".jetflow/demo")


def say(text: str) -> None:
    print(text, flush=True)


async def submit_python(client: Client) -> list[str]:
    say("\n[1] Python API: client.submit(...)")
    ids = [
        await client.submit("echo", {"greeting": "hello from Python"}, priority=5),
        await client.submit("sleep", {"seconds": 0.3}, priority=1),
        await client.submit("fail", {"message": "flaky dependency"}, max_attempts=2),
    ]
    for job_id in ids:
        say(f"    submitted {job_id}")
    return ids


def submit_cli(url: str) -> str:
    say("\n[2] CLI: jetflow submit echo --args '{\"via\": \"cli\"}' --priority 9")
    jetflow = Path(sys.executable).with_name("jetflow")
    out = subprocess.run([str(jetflow), "submit", "echo", "--args", '{"via": "cli"}',
                          "--priority", "9", "--nats", url],
                         capture_output=True, text=True, timeout=60, check=True)
    job_id = out.stdout.strip()
    say(f"    submitted {job_id}")
    return job_id


async def submit_raw(client: Client) -> list[str]:
    say("\n[3] Raw NATS, as `nats pub` / `nats req` would send it")
    body = b'{"handler": "echo", "args": {"via": "nats pub"}}'
    await client.nc.publish(S.submit_subject("default"), body,
                            headers={S.HDR_MSG_ID: "demo-order-42"})
    raw_id = derive_job_id("demo-order-42", "", 0)
    say(f"    nats pub jf.submit.default -H Nats-Msg-Id:demo-order-42 '{body.decode()}'")
    say(f"      -> job id derived from the msg id: {raw_id}")
    reply = await client.nc.request(S.submit_subject("default"),
                                    b'{"handler": "echo", "args": {"via": "nats req"}}', 10)
    say(f"    nats req jf.submit.default '{{\"handler\": \"echo\", ...}}' -> "
        f"{reply.data.decode()}")
    req_id = json.loads(reply.data)["job_id"]
    bad = await client.nc.request(S.submit_subject("default"), b'{"handler": "echo", ', 10)
    say(f"    nats req jf.submit.default '{{\"handler\": \"echo\", ' -> {bad.data.decode()}")
    bad_id = json.loads(bad.data)["job_id"]
    await forge(client, raw_id)
    return [raw_id, req_id, bad_id]


async def forge(client: Client, job_id: str) -> None:
    """What an anonymous client may not do: append a worker's event to the log."""
    subject = f"{S.PREFIX}.job.{job_id}.succeeded"
    try:
        await client.js.publish(subject, b'{"forged": true}', timeout=2)
        say(f"    nats pub {subject} '{{\"forged\": true}}' -> STORED (an insecure stack)")
    except Exception:  # noqa: BLE001 - the server drops it and says so
        say(f"    nats pub {subject} '{{\"forged\": true}}' -> refused by nats-server: "
            f"{last_violation() or 'no acknowledgement'}")


async def show(client: Client, job_ids: list[str]) -> dict[str, str]:
    say("\n[4] Final states and event histories, read from JF_EVENTS")
    states = {}
    for job_id in job_ids:
        job = await client.wait(job_id, timeout=60)
        events = await client.history(job_id)
        states[job_id] = fold(events, job_id).state
        say("")
        for line in job_lines(job, events):
            say("    " + line)
    return states


async def show_projection(client: Client, db_path: Path) -> None:
    say("\n[5] The projector's SQLite view (jobs by state)")
    head = (await client.js.stream_info(S.EVENTS_STREAM)).state.last_seq
    deadline = time.monotonic() + 20
    rows: list[tuple[str, int]] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(db_path) as db:
            (seq,) = db.execute("SELECT last_seq FROM checkpoint").fetchone()
            rows = db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        if seq >= head:
            break
        await asyncio.sleep(0.2)
    say(f"    checkpoint at seq {seq} of {head}")
    for state, count in rows:
        say(f"    {state:<14} {count}")


WORKFLOWS = Path(__file__).resolve().parent / "workflows"


async def start_workflows(client: Client) -> dict[str, object]:
    """The linear example (n = 6 gives 69) and csv_batch (1,000 rows in batches of 200
    give 5 batch workers); their ids, with the result each must reach."""
    say("\n[w] Workflows: register examples/workflows/{linear,csv_batch}.yaml and start them")
    csv = DATA / "rows.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("id,amount\n" + "".join(f"{i},{i % 10}\n" for i in range(1000)))
    expected: dict[str, object] = {}
    for name, context, result in (
            ("linear", {"even_number": 6}, 69),
            ("csv_batch", {"csv": str(csv.resolve()), "batch_size": 200},
             {"total_processed": 1000, "worker_count": 5, "column_total": 4500.0})):
        await client.register_workflow(WORKFLOWS / f"{name}.yaml")
        workflow_id = await client.start_workflow(name, context)
        say(f"    {name}: started {workflow_id} with context {json.dumps(context)}")
        expected[workflow_id] = result
    return expected


async def show_workflows(client: Client, expected: dict[str, object]) -> bool:
    say("\n[w] Each workflow's DAG (jetflow workflow show ID)")
    ok = True
    for workflow_id, result in expected.items():
        view = await client.wait_workflow(workflow_id, timeout=60)
        say("\n".join("    " + line for line in draw(view, time.time()).splitlines()))
        ok = ok and view.state == "succeeded" and view.result == result
    return ok


PLUGIN = Path(__file__).resolve().parent / "plugins" / "csv_to_parquet.py"


async def start_plugin_job(client: Client) -> str:
    """Deploy the example plugin and submit a CSV of 20,000 orders (3 that break the
    contract) to it."""
    from jetflow.adapters.plugins import PluginStore

    say("\n[p] Plugin: jetflow plugin deploy examples/plugins/csv_to_parquet.py, then "
        "jetflow submit csv_to_parquet --input orders.csv")
    deployed = await PluginStore(client.nc).deploy(PLUGIN, by="demo")
    say(f"    deployed {deployed['name']} {deployed['version']} (sha256 "
        f"{deployed['sha256'][:12]}): {deployed['status']}")
    csv = (DATA / "orders.csv").resolve()
    rows = [f"{i},c{i % 7},{i * 0.25},2026-12-0{1 + i % 9}" for i in range(20_000)]
    rows += ["x1,bad,1.0,2026-12-01", "7,,2.0,2026-12-02", "8,c,3.0,someday"]
    csv.write_text("order_id,customer,amount,day\n" + "\n".join(rows) + "\n")
    return await client.submit("csv_to_parquet", {"min_amount": 1}, input=str(csv))


async def show_plugin_job(client: Client, job_id: str) -> bool:
    import pyarrow.parquet as pq

    say("\n[p] The plugin job's outputs (from its succeeded event)")
    job = await client.wait(job_id, timeout=60)
    if job.state != "succeeded":
        say(f"    {job_id} {job.state}: {job.error}")
        return False
    for out in job.result["outputs"]:
        say(f"    {out['name']:<18} {out['rows']:>6} rows  {out['bytes']:>7} bytes  "
            f"quarantined {out['quarantined']}  {out['uri']}")
    quarantine = next(o for o in job.result["outputs"] if o["name"] == "orders_quarantine")
    for row in pq.read_table(quarantine["uri"].removeprefix("file://")).to_pylist():
        say(f"      quarantined: {row['_jf_reason']}")
    rows = {o["name"]: o["rows"] for o in job.result["outputs"]}
    return rows == {"orders": 19_996, "orders_quarantine": 3}


async def main() -> int:
    shutil.rmtree(DATA, ignore_errors=True)
    say("jetflow demo: starting nats-server, a sentinel, two workers and the projector...")
    # as `jetflow up` starts it: each service with its own role, anonymous = submitter
    stack = Stack(data_dir=DATA, port=0, workers=2, auth=True)
    async with stack:
        pids = ", ".join(f"{s.name}={s.pid}" for s in stack.services())
        say(f"  up: NATS at {stack.url}; processes: {pids}")
        say(f"  credentials: one per role, contexts in {stack.data_dir / 'contexts'}/")
        assert stack.auth is not None
        # the user who ran `up` is the admin (deploys, registrations); `nats pub` anonymous
        client = await connect(stack.url, credentials=stack.auth.credentials("admin"))
        anonymous = await connect(stack.url)
        try:
            ids = await submit_python(client)
            workflows = await start_workflows(client)
            plugin_job = await start_plugin_job(client)
            ids.append(submit_cli(stack.url))
            ids += await submit_raw(anonymous)
            states = await show(client, ids)
            workflows_ok = await show_workflows(client, workflows)
            plugin_ok = await show_plugin_job(client, plugin_job)
            await show_projection(client, stack.data_dir / "projections.sqlite")
        finally:
            await client.close()
            await anonymous.close()
    leftovers = [s.name for s in stack.services() if s.running]
    say(f"\n[6] Shut down cleanly; processes still running: {leftovers or 'none'}")
    expected = ["succeeded", "succeeded", "dead_lettered", "succeeded", "succeeded",
                "succeeded", "rejected"]
    got = [states[j] for j in ids]
    ok = got == expected and not leftovers and workflows_ok and plugin_ok
    say("demo " + ("OK: every job reached the state it should, every workflow its exact "
                   "result, and the plugin wrote its Parquet" if ok else
                   f"FAILED: expected {expected}, got {got}; workflows "
                   f"{'ok' if workflows_ok else 'not as expected'}; plugin "
                   f"{'ok' if plugin_ok else 'not as expected'}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
