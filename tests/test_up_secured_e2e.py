"""`jetflow up` as a user runs it, secured by default: credentials made on first start
(0600), every service under its role, commands run on the same machine finding the
contexts by themselves from any directory (cancel, plugin deploy, workflow register, the
read commands, a worker started by hand), anonymous clients limited to submitting and
reading; and `jetflow up --tls`, where everything connects over TLS with a generated CA."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from jetflow.adapters.bus import messages_on
from jetflow.adapters.client import connect
from tests.test_projections_e2e import cli
from tests.test_up_and_connect import free_port, jetflow_env

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Up:
    proc: asyncio.subprocess.Process
    url: str
    data: Path
    env: dict[str, str]
    banner: str
    elsewhere: Path  # a directory that is not the one `up` ran in

    async def run(self, *args: str, env: dict[str, str] | None = None
                  ) -> tuple[int, str, str]:
        return await cli(self.url, *args, cwd=self.elsewhere, env=env or self.env)


async def start_up(tmp: Path, *flags: str) -> Up:
    state, data, elsewhere = tmp / "state", tmp / "data", tmp / "elsewhere"
    elsewhere.mkdir()
    env = jetflow_env(JETFLOW_STATE_DIR=str(state))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "up", "--port", str(port), "--data", str(data),
        "--workers", "1", *flags, cwd=tmp, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    assert proc.stdout is not None
    lines = []
    while len(lines) < 3:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, f"up ended: {lines}"
        lines.append(line)
    assert lines[0].startswith("jetflow is up"), lines
    return Up(proc, f"nats://127.0.0.1:{port}", data, env, "".join(lines), elsewhere)


async def stop_up(up: Up) -> None:
    if up.proc.returncode is None:
        up.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(up.proc.wait(), 60)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def up(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Up]:
    started = await start_up(tmp_path_factory.mktemp("up-secured"))
    try:
        yield started
    finally:
        await stop_up(started)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_first_start_makes_private_credentials_and_says_where(up: Up) -> None:
    contexts = up.data / "contexts"
    assert f"contexts in {contexts}/" in up.banner
    assert mode(up.data / "credentials.json") == 0o600
    assert mode(up.data / "nats.conf") == 0o600
    for role in ("submitter", "operator", "sentinel", "projector", "admin"):
        context = contexts / f"{role}.json"
        assert mode(context) == 0o600
        doc = json.loads(context.read_text())
        assert doc["url"] == up.url and doc["user"] == role and doc["password"]
    password = json.loads((contexts / "admin.json").read_text())["password"]
    assert password not in up.banner


async def test_commands_from_another_directory_find_the_local_contexts(up: Up) -> None:
    code, out, err = await up.run("submit", "echo", "--args", '{"n": 1}', "--wait")
    assert code == 0 and "succeeded" in out, err
    code, out, err = await up.run("submit", "sleep", "--args", '{"seconds": 30}')
    assert code == 0, err
    job_id = out.strip()
    for _ in range(100):
        if (await up.run("job", job_id, "--json"))[1].count('"running"'):
            break
        await asyncio.sleep(0.1)
    code, out, err = await up.run("cancel", job_id)
    assert code == 0 and "cancel requested" in out, err
    code, out, err = await up.run("plugin", "deploy",
                                  str(ROOT / "examples" / "plugins" / "csv_to_parquet.py"))
    assert code == 0 and "deployed csv_to_parquet" in out, err
    code, out, err = await up.run("workflow", "register", str(
        ROOT / "examples" / "workflows" / "conditional_approval.yaml"))
    assert code == 0 and "registered conditional_approval" in out, err
    code, out, err = await up.run("history", job_id)
    assert code == 0 and "cancel_requested" in out, err
    client = await connect(up.url)  # anonymous: a submitter may wait
    try:
        assert (await client.wait(job_id, timeout=30)).state == "cancelled"
    finally:
        await client.close()
    code, out, err = await up.run("jobs")
    assert code == 0 and job_id in out, err


async def test_a_worker_started_by_hand_gets_an_identity_of_its_own(up: Up) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "worker", "--handlers", "echo", "--queue",
        "byhand", "--nats", up.url, cwd=up.elsewhere, env=up.env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        code, out, err = await up.run("submit", "echo", "--queue", "byhand", "--args",
                                      '{"by": "hand"}', "--wait", "--timeout", "30")
        assert code == 0 and '"by": "hand"' in out, err
        users = json.loads((up.data / "credentials.json").read_text())["users"]
        assert sum(1 for u in users if u["role"] == "worker") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err_b = await asyncio.wait_for(proc.communicate(), 60)
    assert "Violation" not in (up.data / "nats-server.log").read_text()
    assert "permissions violation" not in err_b.decode()


async def test_without_the_contexts_a_command_is_a_submitter(up: Up, tmp_path: Path) -> None:
    away = {**up.env, "JETFLOW_STATE_DIR": str(tmp_path)}  # finds no local stack
    code, out, err = await up.run("submit", "echo", "--args", "{}", "--wait", env=away)
    assert code == 0 and "succeeded" in out, err
    plugin = tmp_path / "csv_to_parquet.py"  # a version not deployed yet
    plugin.write_text((ROOT / "examples" / "plugins" / "csv_to_parquet.py").read_text()
                      .replace('VERSION = "1.0.0"', 'VERSION = "9.9.9"'))
    assert "9.9.9" in plugin.read_text()
    code, out, err = await up.run("plugin", "deploy", str(plugin), env=away)
    assert code == 1 and err.count("\n") == 1 and "ermission" in err, out + err
    code, _, err = await up.run("jobs", env={**away, "JETFLOW_USER": "admin",
                                             "JETFLOW_PASSWORD": "wrong"})
    assert code == 1 and "refused" in err and "user admin" in err and "wrong" not in err, err
    nc = await nats.connect(up.url, error_cb=_quiet)
    try:
        with pytest.raises(nats.errors.Error):  # refused: no PubAck ever comes
            await nc.jetstream().publish("jf.job.anything.succeeded", b"{}", timeout=2)
        with pytest.raises(nats.errors.Error):
            await nc.jetstream().delete_stream("JF_EVENTS")
        assert await messages_on(nc.jetstream(), ["jf.job.anything.>"]) == []
        assert (await nc.jetstream().stream_info("JF_EVENTS")).config.name == "JF_EVENTS"
    finally:
        await nc.close()


async def _quiet(_exc: Exception) -> None:
    return None


async def test_up_tls_connects_everything_over_tls(tmp_path: Path) -> None:
    up = await start_up(tmp_path, "--tls")
    try:
        ca = up.data / "tls" / "ca.pem"
        assert ca.is_file() and mode(up.data / "tls" / "server-key.pem") == 0o600
        assert "TLS" in up.banner
        assert json.loads((up.data / "contexts" / "submitter.json").read_text())["ca"] == \
            str(ca)
        code, out, err = await up.run("submit", "echo", "--args", '{"tls": true}', "--wait")
        assert code == 0 and '"tls": true' in out, err
        with pytest.raises(Exception):  # noqa: B017 - plain TCP is refused, whatever nats-py says
            await asyncio.wait_for(nats.connect(up.url, allow_reconnect=False,
                                                max_reconnect_attempts=0,
                                                error_cb=_quiet), 10)
        code, out, err = await up.run("submit", "echo", "--args", '{"anon": 1}', "--wait",
                                      "--tls-ca", str(ca),
                                      env={**up.env, "JETFLOW_STATE_DIR": str(tmp_path)})
        assert code == 0 and '"anon": 1' in out, err
    finally:
        await stop_up(up)
    assert not (tmp_path / "state" / "stacks").exists() or \
        not list((tmp_path / "state" / "stacks").glob("*.json"))
    assert os.environ.get("JETFLOW_CONTEXT") is None


async def test_up_tls_serves_a_certificate_of_ones_own(tmp_path: Path) -> None:
    from jetflow.adapters.tls import ensure_tls

    mine = ensure_tls(tmp_path / "mine")  # made elsewhere: what an admin would bring
    other = ensure_tls(tmp_path / "other")
    code, _, err = await cli("nats://127.0.0.1:1", "up", "--tls", "--tls-server-cert",
                             str(mine.cert), "--tls-server-key", str(other.key),
                             "--tls-server-ca", str(mine.ca), env=jetflow_env())
    assert code == 1 and "is not the key of" in err and err.count("\n") == 1, err
    up = await start_up(tmp_path, "--tls", "--tls-server-cert", str(mine.cert),
                        "--tls-server-key", str(mine.key), "--tls-server-ca", str(mine.ca))
    try:
        assert not (up.data / "tls").exists() and str(mine.ca) in up.banner
        assert json.loads((up.data / "contexts" / "admin.json").read_text())["ca"] == \
            str(mine.ca)
        code, out, err = await up.run("submit", "echo", "--args", '{"mine": 1}', "--wait")
        assert code == 0 and '"mine": 1' in out, err
    finally:
        await stop_up(up)
