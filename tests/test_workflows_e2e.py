"""Workflows end to end: the shipped examples against a real nats-server, sentinel and
workers (the handlers `jetflow up` serves by default), each against its exact result;
the CLI, plain NATS, cancel and traces. One stack for the whole module (nothing here
kills it): starting one per test would cost more than the tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jetflow import Client, SubmissionRejected, WorkflowView, connect
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S
from jetflow.core.codec import loads
from jetflow.core.workflow import step_job_id
from jetflow.projections.views import trace_id_of
from jetflow.up import Stack
from tests.conftest import read_log
from tests.test_projections_e2e import cli

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "workflows"


class World:
    def __init__(self, url: str, client: Client, tmp: Path) -> None:
        self.url, self.client, self.tmp = url, client, tmp

    async def run(self, name: str, context: Any, timeout: float = 60) -> WorkflowView:
        await self.client.register_workflow(EXAMPLES / f"{name}.yaml")
        wf = await self.client.start_workflow(name, context)
        return await self.client.wait_workflow(wf, timeout=timeout)

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        return await cli(self.url, *argv, cwd=ROOT)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("wf")
    async with EmbeddedServer(tmp / "srv", port=0) as srv:
        stack = Stack(data_dir=tmp / "stack", nats_url=srv.url, workers=2, projector=False,
                      lease_s=5.0)
        await stack.start()
        client = await connect(srv.url)
        try:
            yield World(srv.url, client, tmp)
        finally:
            await client.close()
            await stack.stop()


EXACT = [
    ("linear", {"even_number": 6}, 69),
    ("linear", {"even_number": 10}, 165),
    ("diamond", {"even_number": 4}, 4**16),
    ("tree", {"even_number": 2}, 2**64),
    ("mixed_dag", {"even_number": 6}, 6**64),
]


async def test_arithmetic_examples_are_exact(world: World) -> None:
    views = await asyncio.gather(*(world.run(n, c) for n, c, _ in EXACT))
    for (name, context, expected), view in zip(EXACT, views, strict=True):
        assert view.state == "succeeded", (name, view.reason)
        assert view.result == expected and type(view.result) is int, (name, context)
        assert all(s.state == "succeeded" and s.attempts == 1 for s in view.steps.values())


@pytest.mark.parametrize(("amount", "path", "ran"), [
    (500, "auto", ["auto_approve"]),
    (3000, "manager_only", ["manager_approval"]),
    (7000, "dual", ["finance_review", "manager_approval"]),
])
async def test_conditional_approval(world: World, amount: int, path: str,
                                    ran: list[str]) -> None:
    view = await world.run("conditional_approval", {"amount": amount})
    assert view.state == "succeeded"
    assert view.result["approval_path"] == path
    assert sorted(s for s in ("auto_approve", "manager_approval", "finance_review")
                  if view.steps[s].state == "succeeded") == ran
    assert {view.steps[s].state for s in view.steps if s not in ran and s in
            ("auto_approve", "manager_approval", "finance_review")} <= {"skipped"}


async def test_conditional_approval_refuses_a_bad_amount_permanently(world: World) -> None:
    view = await world.run("conditional_approval", {"amount": 0})
    assert view.state == "failed"
    step = view.steps["validate_request"]
    assert step.state == "failed" and step.attempts == 1
    assert "context.amount must be a number above 0" in json.dumps(step.error)
    assert view.steps["finalize_approval"].state == "skipped"


async def test_csv_batch(world: World) -> None:
    rows = world.tmp / "rows.csv"
    rows.write_text("id,value\n" + "".join(f"{i},{i % 7}\n" for i in range(1000)))
    full, empty = await asyncio.gather(
        world.run("csv_batch", {"csv": str(rows), "batch_size": 200}),
        world.run("csv_batch", {"csv": "id,value\n", "batch_size": 200}))
    assert full.state == "succeeded"
    assert full.result["total_processed"] == 1000 and full.result["worker_count"] == 5
    assert sorted(n for n in full.steps if n.startswith("process_csv_batch_")) == [
        f"process_csv_batch_{i:03d}" for i in range(5)]
    assert empty.state == "succeeded"
    assert empty.result == {"total_processed": 0, "worker_count": 0, "column_total": 0}


async def test_error_scenarios(world: World) -> None:
    retried, permanent, retryable, roots = await asyncio.gather(
        world.run("retry_then_succeed", {}), world.run("permanent_error", {}),
        world.run("retryable_error", {}), world.run("three_roots", {}))
    assert retried.state == "succeeded"
    assert retried.steps["fail_twice_then_succeed"].attempts == 3
    assert permanent.state == "failed"
    assert permanent.steps["permanent_error_step"].attempts == 1
    assert permanent.finished_at and permanent.started_at
    assert permanent.finished_at - permanent.started_at < 5
    assert retryable.state == "failed"
    assert retryable.steps["retryable_error_step"].attempts == 2
    history = await world.client.history(retryable.steps["retryable_error_step"].job_id)
    assert history[-1].type == "dead_lettered"
    assert [e.type for e in history].count("started") == 2
    assert roots.state == "failed"
    assert roots.steps["success_step"].state == "succeeded"
    assert roots.steps["permanent_error_step"].attempts == 1
    assert roots.steps["retryable_error_step"].attempts == 2


async def test_cli_start_from_a_file_waits_and_prints_the_contract(world: World) -> None:
    code, out, err = await world.cli(
        "workflow", "start", "examples/workflows/linear.yaml", "--context",
        '{"even_number": 6}', "--wait", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert {"workflow_id", "name", "version", "state", "result", "steps"} <= doc.keys()
    assert doc["state"] == "succeeded" and doc["result"] == 69 and doc["name"] == "linear"
    assert set(doc["steps"]) == {f"linear_step_{i}" for i in range(1, 5)}
    for step in doc["steps"].values():
        assert {"state", "attempts", "result", "error", "job_id"} <= step.keys()
    assert doc["steps"]["linear_step_1"]["result"] == 36

    code, out, err = await world.cli("workflow", "show", doc["workflow_id"])
    assert code == 0, err
    assert "linear_step_4" in out and "succeeded" in out and "result: 69" in out

    code, out, err = await world.cli("workflow", "start", str(EXAMPLES / "permanent_error.yaml"),
                                     "--wait", "--json")
    assert code == 1 and json.loads(out)["state"] == "failed", err


async def test_cli_register_list_and_versions(world: World) -> None:
    doc = (EXAMPLES / "linear.yaml").read_text().replace("name: linear\n", "name: lin_cli\n")
    path = world.tmp / "lin_cli.yaml"
    path.write_text(doc)
    code, out, err = await world.cli("workflow", "register", str(path), "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["version"] == 1 and first["created"] and first["steps"] == 4
    code, out, _ = await world.cli("workflow", "register", str(path), "--json")
    assert json.loads(out)["version"] == 1 and not json.loads(out)["created"]
    path.write_text(doc.replace('description: "', 'description: "changed: '))
    code, out, _ = await world.cli("workflow", "register", str(path), "--json")
    assert json.loads(out)["version"] == 2 and json.loads(out)["created"]
    code, out, _ = await world.cli("workflow", "list", "--json")
    listed = {r["name"]: r for r in json.loads(out)}
    assert listed["lin_cli"]["version"] == 2 and listed["lin_cli"]["steps"] == 4
    assert [v["version"] for v in listed["lin_cli"]["versions"]] == [1, 2]
    code, out, _ = await world.cli("workflow", "list")
    assert "lin_cli" in out and "NAME" in out and "VERSIONS" in out
    code, out, err = await world.cli("workflow", "start", "lin_cli", "--version", "1",
                                     "--context", '{"even_number": 10}', "--wait", "--json")
    assert code == 0 and json.loads(out)["version"] == 1 and json.loads(out)["result"] == 165


async def test_cli_register_refuses_a_bad_template_in_one_line(world: World) -> None:
    bad = world.tmp / "cycle.yaml"
    bad.write_text("name: cyc\nsteps:\n  - {name: a, handler: wf_succeed, depends_on: [b]}\n"
                   "  - {name: b, handler: wf_succeed, depends_on: [a]}\n")
    code, out, err = await world.cli("workflow", "register", str(bad))
    assert code == 1 and err.count("\n") == 1 and "a cycle: a -> b -> a" in err, err
    code, out, err = await world.cli("workflow", "register", str(world.tmp / "nope.yaml"))
    assert code == 1 and "cannot read" in err and "Traceback" not in err
    unknown = world.tmp / "unknown.yaml"
    unknown.write_text("name: unk\nsteps:\n  - {name: a, handler: nobody_serves_this}\n")
    code, out, err = await world.cli("workflow", "register", str(unknown))
    assert code == 0 and "warning: no worker has announced handler(s) nobody_serves_this" \
        in err, err
    code, out, err = await world.cli("workflow", "start", "no_such_workflow", "--json")
    assert code == 2 and json.loads(out)["rejected"]["code"] == "unknown_workflow"


async def test_plain_nats_start_answers_the_workflow_id(world: World) -> None:
    await world.client.register_workflow(EXAMPLES / "linear.yaml")
    body = b'{"workflow": "linear", "context": {"even_number": 6}}'
    nc = world.client.nc
    reply = await nc.request("jf.submit.default", body, timeout=10,
                             headers={S.HDR_MSG_ID: "plain-wf-1"})
    answer = loads(reply.data)
    assert set(answer) >= {"workflow_id"}
    again = loads((await nc.request("jf.submit.default", body, timeout=10,
                                    headers={S.HDR_MSG_ID: "plain-wf-1"})).data)
    assert again["workflow_id"] == answer["workflow_id"]
    view = await world.client.wait_workflow(answer["workflow_id"], timeout=30)
    assert view.result == 69
    own = await world.client.start_workflow("linear", {"even_number": 6},
                                            workflow_id="my-wf-1")
    same = await world.client.start_workflow("linear", {"even_number": 6},
                                             workflow_id="my-wf-1")
    assert own == same == "my-wf-1"
    await world.client.wait_workflow(own, timeout=30)
    starts = await read_log(world.url, ["jf.wf.my-wf-1.started"])
    assert len(starts) == 1
    with pytest.raises(SubmissionRejected, match="unknown workflow 'nope'"):
        await world.client.start_workflow("nope", {})


async def test_steps_are_tagged_jobs_in_the_workflows_trace(world: World) -> None:
    await world.client.register_workflow(EXAMPLES / "diamond.yaml")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = await world.client.nc.request(
        "jf.submit.default", b'{"workflow": "diamond", "context": {"even_number": 4}}',
        timeout=10, headers={S.HDR_MSG_ID: "traced-wf-1",
                             S.HDR_TRACEPARENT: f"00-{trace_id}-00f067aa0ba902b7-01"})
    wf_id = loads(reply.data)["workflow_id"]
    view = await world.client.wait_workflow(wf_id, timeout=30)
    assert view.result == 4**16
    started = (await read_log(world.url, [f"jf.wf.{wf_id}.started"]))[0]
    for name, step in view.steps.items():
        assert step.job_id == step_job_id(wf_id, name)
        events = await world.client.history_with_headers(step.job_id)
        submitted, headers = events[0]
        assert submitted.type == "submitted"
        assert submitted.data["workflow"] == wf_id and submitted.data["step"] == name
        assert submitted.data["correlation_id"] == started.data["correlation_id"]
        assert headers.get(S.HDR_CORRELATION_ID) == started.data["correlation_id"]
        assert trace_id_of(headers.get(S.HDR_TRACEPARENT)) == trace_id, name  # one trace
    parents = (await world.client.history(view.steps["diamond_end"].job_id))[0]
    assert parents.data["args"]["parents"] == {"diamond_branch_b": 4**4,
                                               "diamond_branch_c": 4**4}


async def test_cancel_stops_running_and_pending_steps(world: World) -> None:
    t = world.tmp / "slow.yaml"
    t.write_text("name: slow_wf\nsteps:\n"
                 "  - {name: nap, handler: wf_sleep, args: {seconds: 30}}\n"
                 "  - {name: after, handler: wf_succeed, depends_on: [nap]}\n"
                 "  - {name: quick, handler: wf_succeed}\n")
    await world.client.register_workflow(t)
    wf = await world.client.start_workflow("slow_wf", {})
    for _ in range(100):
        if (await world.client.workflow_status(wf)).steps["nap"].state == "running":
            break
        await asyncio.sleep(0.1)
    code, out, err = await world.cli("workflow", "cancel", wf, "--json")
    assert code == 0 and json.loads(out)["state"] == "cancel_requested", out + err
    view = await world.client.wait_workflow(wf, timeout=20)
    assert view.state == "cancelled"
    assert view.steps["nap"].state == "cancelled"
    assert view.steps["after"].state == "skipped"
    assert view.steps["quick"].state == "succeeded"
    code, out, _ = await world.cli("workflow", "cancel", wf)
    assert code == 0 and "already cancelled" in out
    code, out, _ = await world.cli("workflows", "--state", "cancelled", "--json")
    assert wf in [r["workflow_id"] for r in json.loads(out)]

