"""``jetflow credentials DIR``: each role on "its own machine" against a server ``jetflow up``
does not start, as the README says to run a cluster: the server includes the generated
authorization block, every service runs with its own context, and the roles hold."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest

from jetflow import connect
from jetflow.adapters.nats_server import EmbeddedServer
from tests.test_projections_e2e import cli

pytestmark = pytest.mark.e2e


async def _quiet(_exc: Exception) -> None:
    return None


async def credentials(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "credentials", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def _service(url: str, log: Path, *args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETFLOW_")}
    with log.open("wb") as out:  # the child has its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jetflow.cli", *args, "--nats", url, env=env,
            stdout=out, stderr=asyncio.subprocess.STDOUT)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    creds = tmp_path / "creds"
    code, out, err = await credentials(str(creds), "--url", "nats://127.0.0.1:1",
                                       "--worker", "w1", "--worker", "w2")
    assert code == 0, err
    assert "authorization.conf" in out
    stored = json.loads((creds / "credentials.json").read_text())
    secrets = [u["password"] for u in stored["users"]] + [stored["origin_secret"]]
    assert not [x for x in secrets if x in out + err]  # no secret is printed
    # as the README says: next to the server's configuration, included by a relative path
    (tmp_path / "srv").mkdir()
    shutil.copy(creds / "authorization.conf", tmp_path / "srv" / "authorization.conf")
    server = EmbeddedServer(tmp_path / "srv", port=0, extra='include "authorization.conf"\n')
    async with server:
        ctx = creds / "contexts"
        code, _, err = await cli(server.url, "init", "--context", str(ctx / "operator.json"))
        assert code == 1 and "ermission" in err and err.count("\n") == 1, err
        code, out, err = await cli(server.url, "init", "--context", str(ctx / "admin.json"))
        assert code == 0 and "JF_EVENTS" in out, out + err
        yield server.url, creds


async def test_each_role_runs_with_its_own_context_against_a_server_it_did_not_start(
        cluster: tuple[str, Path], tmp_path: Path) -> None:
    url, creds = cluster
    for path in [creds / "credentials.json", creds / "authorization.conf",
                 *(creds / "contexts").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ctx = creds / "contexts"
    procs = [await _service(url, tmp_path / "sentinel.log", "sentinel", "--context",
                            str(ctx / "sentinel.json")),
             await _service(url, tmp_path / "w1.log", "worker", "--id", "w1", "--handlers",
                            "echo", "--context", str(ctx / "worker-w1.json"))]
    try:
        client = None
        for _ in range(100):  # anonymous: a submitter
            try:
                client = await connect(url)
                job_id = await client.submit("echo", {"on": "cluster"}, reply_timeout_s=2)
                break
            except Exception:  # noqa: BLE001 - the services are still starting
                if client is not None:
                    await client.close()
                    client = None
                await asyncio.sleep(0.3)
        else:
            raise AssertionError((tmp_path / "sentinel.log").read_text()[-2000:])
        assert client is not None
        try:
            done = await client.wait(job_id, timeout=60)
            assert done.state == "succeeded" and done.result == {"on": "cluster"}
        finally:
            await client.close()
        # worker w1 cannot beat as w2, nor decide for the sentinel
        w1 = await connect(url, context=ctx / "worker-w1.json")
        try:
            for subject in ("jf.hb.w2", f"jf.job.{job_id}.queued"):
                with pytest.raises(nats.errors.Error):
                    await w1.nc.request(subject, b"{}", timeout=1)
        finally:
            await w1.close()
        # the operator may cancel; the submitter context may not
        code, _, err = await cli(url, "cancel", job_id, "--context",
                                 str(ctx / "submitter.json"))
        assert code == 1 and "ermission" in err and err.count("\n") == 1, err
        code, out, err = await cli(url, "cancel", job_id, "--context",
                                   str(ctx / "operator.json"))
        assert code in (0, 1) and "ermission" not in err, out + err
    finally:
        for proc in procs:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


async def test_run_again_it_keeps_the_passwords_and_adds_workers(
        cluster: tuple[str, Path]) -> None:
    _url, creds = cluster
    before = (creds / "contexts" / "admin.json").read_text()
    code, _, err = await credentials(str(creds), "--url", "nats://127.0.0.1:1", "--worker",
                                     "w3")
    assert code == 0, err
    assert (creds / "contexts" / "admin.json").read_text() == before
    assert (creds / "contexts" / "worker-w3.json").exists()
    code, _, err = await credentials(str(creds), "--url", "nats://x:1", "--worker", "bad.id")
    assert code == 1 and "worker id" in err and err.count("\n") == 1, err
