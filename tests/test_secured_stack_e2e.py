"""A stack whose every service runs with its own credentials (``Stack(auth=True)``): jobs,
a plugin job and a workflow run end to end under the roles' permissions, an operator
cancels, an anonymous client submits and cannot forge an outcome, and the server refused
nothing a service did."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from jetflow.adapters.client import Client, connect
from jetflow.adapters.plugins import PluginStore
from jetflow.adapters.workflows import wait_end
from jetflow.up import Stack
from tests.test_projections_e2e import cli

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    data = tmp_path_factory.mktemp("secured-stack")
    st = Stack(data_dir=data, port=0, workers=1, projector=False, auth=True)
    await st.start(ready_timeout_s=30)
    try:
        yield st
    finally:
        await st.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def admin(stack: Stack) -> AsyncIterator[Client]:
    client = Client(await stack.connect())
    try:
        yield client
    finally:
        await client.close()


async def cli_as(stack: Stack, role: str, *args: str) -> tuple[int, str, str]:
    """A jetflow command run with ``role``'s context file."""
    context = stack.data_dir / "contexts" / f"{role}.json"
    return await cli(stack.url, "--context", str(context), *args)


def violations(stack: Stack) -> list[str]:
    log = (stack.data_dir / "nats-server.log").read_text()
    return [line for line in log.splitlines() if "Violation" in line]


async def test_jobs_plugins_and_workflows_run_under_the_roles(stack: Stack,
                                                              admin: Client) -> None:
    job = await admin.wait(await admin.submit("echo", {"n": 1}), timeout=30)
    assert job.state == "succeeded" and job.result == {"n": 1}
    await PluginStore(admin.nc).deploy(ROOT / "examples" / "plugins" / "csv_to_parquet.py",
                                       by="test")
    csv = stack.data_dir / "orders.csv"
    csv.write_text("order_id,customer,amount,day\n1,a,2.5,2026-12-01\n2,b,3,2026-12-02\n")
    job = await admin.wait(await admin.submit("csv_to_parquet", {}, input=str(csv)),
                           timeout=60)
    assert job.state == "succeeded", job.error
    assert job.result is not None and job.result["outputs"][0]["rows"] == 2
    await admin.register_workflow(ROOT / "examples" / "workflows" /
                                  "conditional_approval.yaml")
    workflow_id = await admin.start_workflow("conditional_approval", {"amount": 2000})
    assert await wait_end(admin.nc, workflow_id, 60) == "succeeded"
    assert violations(stack) == []


async def test_an_operator_cancels_with_its_context(stack: Stack, admin: Client) -> None:
    job_id = await admin.submit("sleep", {"seconds": 30})
    for _ in range(100):
        if (await admin.status(job_id)).state == "running":
            break
        await asyncio.sleep(0.05)
    code, _out, err = await cli_as(stack, "operator", "cancel", job_id)
    assert code == 0, err
    assert (await admin.wait(job_id, timeout=30)).state == "cancelled"


async def test_anonymous_submits_and_cannot_forge_an_outcome(stack: Stack,
                                                             admin: Client) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    anonymous = await nats.connect(stack.url, error_cb=on_error)
    try:
        reply = await anonymous.request("jf.submit.default",
                                        json.dumps({"handler": "sleep",
                                                    "args": {"seconds": 1}}).encode(),
                                        timeout=10)
        job_id = json.loads(reply.data)["job_id"]
        await asyncio.sleep(0.3)
        forged = json.dumps({"v": 2, "at": 1.0, "data": {"attempt": 1, "worker": "x",
                                                        "result": {"forged": True}}})
        await anonymous.publish(f"jf.job.{job_id}.succeeded", forged.encode())
        await anonymous.flush()
        await asyncio.sleep(0.3)
    finally:
        await anonymous.close()
    assert any("permissions violation" in e.lower() for e in errors)
    job = await admin.wait(job_id, timeout=30)
    assert job.state == "succeeded" and job.result != {"forged": True}
    assert [v for v in violations(stack) if "user:submitter" not in v] == []


async def test_a_submitter_submits_waits_and_reads_creating_nothing(stack: Stack,
                                                                   admin: Client) -> None:
    before = len(violations(stack))
    submitter = await connect(stack.url)  # anonymous: the submitter role
    try:
        job_id = await submitter.submit("echo", {"m": 2})
        job = await submitter.wait(job_id, timeout=30)
        assert job.state == "succeeded" and job.result == {"m": 2}
        types = [e.type for e in await submitter.history(job_id)]
        assert types[0] == "submitted" and types[-1] == "succeeded"
    finally:
        await submitter.close()
    code, out, err = await cli_as(stack, "submitter", "history", job_id)
    assert code == 0, err
    assert "succeeded" in out
    assert violations(stack)[before:] == []  # nothing it did was refused


async def test_a_submitter_starts_waits_for_and_reads_a_workflow(stack: Stack,
                                                                admin: Client) -> None:
    """The workflow read path (its events, each step's, and the template the view is
    drawn from, by direct gets) creates nothing, so a submitter may take it."""
    await admin.register_workflow(ROOT / "examples" / "workflows" / "linear.yaml")
    before = len(violations(stack))
    submitter = await connect(stack.url)
    try:
        workflow_id = await submitter.start_workflow("linear", {"even_number": 6})
        view = await submitter.wait_workflow(workflow_id, timeout=60)
        assert view.state == "succeeded" and view.result == 69
        assert "linear" in [t["name"] for t in await submitter.templates()]
    finally:
        await submitter.close()
    code, out, err = await cli_as(stack, "submitter", "workflow", "show", workflow_id)
    assert code == 0 and "succeeded" in out, err
    assert violations(stack)[before:] == []
