"""What a new user meets in the first hour, tried as they would: `jetflow up` with JSON
logs and read commands from another directory, a handler module next to them, a job id
submitted twice, a big --args, cancel reasons, one rule for job ids, mistakes that must
be one line. Real processes, a real nats-server."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import orjson
import pytest

from jetflow import Client
from jetflow.adapters.bus import connect
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S
from tests.conftest import StackFactory, url_of, wait_until
from tests.test_cli_errors import one_line
from tests.test_projections_e2e import caught_up, cli
from tests.test_up_and_connect import free_port, jetflow_env, jetflow_up

pytestmark = pytest.mark.e2e

JETFLOW = str(Path(sys.executable).parent / "jetflow")  # the console script


async def run(*argv: str, cwd: Path, env: dict[str, str] | None = None,
              stdin: bytes | None = None) -> tuple[int, str, str]:
    """A command as a user types it (the console script), in ``cwd``."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env or jetflow_env(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- `jetflow up`, seen from elsewhere ------------------------------------------------------

async def test_up_with_options_first_logs_json_and_is_read_from_any_directory(
        tmp_path: Path) -> None:
    """`jetflow --log-format json up`: the common options may come before the command,
    and up hands them to its services. Read commands run in another directory find the
    projection of the projector that runs (it says where its file is over NATS)."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with jetflow_up(tmp_path, "--port", str(port), before=["--log-format", "json"]
                          ) as (up, _):
        client = Client(await connect(url))
        try:
            job_id = await client.submit("echo", {"from": "up"})
            assert (await client.wait(job_id, timeout=30)).state == "succeeded"
        finally:
            await client.close()
        db = up.data / "projections.sqlite"
        await caught_up(db, url)
        for name in ("worker-1", "sentinel-1", "projector"):
            lines = (up.data / "logs" / f"{name}.log").read_text().splitlines()
            assert lines and all(json.loads(line)["service"] for line in lines), lines

        nc = await connect(url)
        where = orjson.loads((await nc.request(S.PROJECTOR_WHERE, b"", timeout=5)).data)
        await nc.close()
        assert Path(where["db"]) == db.resolve() and where["pid"] > 0

        code, out, err = await cli(url, "status", "--json", cwd=elsewhere)
        assert code == 0, err
        assert json.loads(out)["as_of"]["seq"] >= 1
        code, out, err = await cli(url, "jobs", "--json", cwd=elsewhere)
        assert job_id in [j["job_id"] for j in json.loads(out)["jobs"]], out + err
        code, out, err = await cli(url, "job", job_id, "--json", cwd=elsewhere)
        assert json.loads(out)["source"] == "projection", out + err
        code, out, err = await cli(url, "replay", "--verify", "--json", cwd=elsewhere)
        assert code == 0 and json.loads(out)["ok"], out + err
        assert not (elsewhere / ".jetflow").exists()
    assert up.proc.returncode == 0, up.log()


async def test_without_a_projector_read_commands_say_where_to_look(server: EmbeddedServer,
                                                                   tmp_path: Path) -> None:
    code, _, err = await cli(server.url, "status", cwd=tmp_path)
    line = one_line(err)
    assert code == 1 and "--db" in line and "--data" in line, line
    assert "no projector answered" in line
    assert "run `jetflow" not in line and "(or `jetflow up`)" not in line, line
    code, _, err = await cli(server.url, "workers", "--data", str(tmp_path / "none"),
                             cwd=tmp_path)
    assert code == 1 and "--data" in one_line(err)


async def test_workers_reads_heartbeats_at_the_default_url(make_stack: StackFactory,
                                                          client: Client,
                                                          tmp_path: Path) -> None:
    """Without --nats or JETFLOW_NATS_URL, `jetflow workers` reads heartbeats where every
    other command connects (nats://127.0.0.1:4222), and never blames a flag nobody gave."""
    stack = await make_stack(workers=1, projector=True)
    db = stack.data_dir / "projections.sqlite"
    await caught_up(db, url_of(client))
    with socket.socket() as probe:
        busy = probe.connect_ex(("127.0.0.1", 4222)) == 0  # a stack of the user's, say
    code, out, err = await run(JETFLOW, "workers", "--db", str(db), cwd=tmp_path)
    assert code == 0, err
    assert "--no-heartbeats" not in out
    if not busy:  # nothing there: the default URL was tried, and said
        assert "heartbeats unavailable" in out and "127.0.0.1:4222" in out, out
    code, out, _ = await run(JETFLOW, "workers", "--db", str(db), "--no-heartbeats",
                             cwd=tmp_path)
    assert "heartbeats not read (--no-heartbeats)" in out


# -- configuration mistakes at start -----------------------------------------------------------

async def test_up_with_a_handler_that_cannot_run_stops_with_the_reason(tmp_path: Path) -> None:
    for handlers, expected in (("nope", "unknown handler 'nope'"),
                               ("x=no_such_module:fn", "cannot import 'no_such_module'")):
        code, out, err = await run(JETFLOW, "up", "--port", str(free_port()), "--data",
                                   str(tmp_path / handlers[:4]), "--handlers", handlers,
                                   "--workers", "1", cwd=tmp_path)
        assert code == 1 and "jetflow is up" not in out, out + err
        line = one_line(err)
        assert "worker-1 ended while starting" in line and expected in line, line
    for workers in ("0", "-1"):
        code, _, err = await run(JETFLOW, "up", "--workers", workers, cwd=tmp_path)
        assert code == 2 and "--workers: must be 1 or more" in err


async def test_a_handler_module_in_the_current_directory_is_importable(
        make_stack: StackFactory, client: Client, tmp_path: Path) -> None:
    stack = await make_stack(workers=0)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "handlers.py").write_text(
        "def hello(args, ctx):\n    return {'hello': args.get('name'), 'job': ctx.job_id}\n")
    proc = await asyncio.create_subprocess_exec(
        JETFLOW, "worker", "--handlers", "hello=mypkg.handlers:hello", "--nats", stack.url,
        cwd=tmp_path, env=jetflow_env(), stderr=asyncio.subprocess.PIPE)
    try:
        async def joined() -> bool:
            ping = await client.nc.request(S.SENTINEL_PING, b"", timeout=5)
            return bool(orjson.loads(ping.data)["workers"])
        await wait_until(joined, 30, "the worker to join")
        job_id = await client.submit("hello", {"name": "you"})
        job = await client.wait(job_id, timeout=30)
        assert job.state == "succeeded" and job.result == {"hello": "you", "job": job_id}
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    code, _, err = await run(JETFLOW, "worker", "--handlers", "x=mypkg.nothing:hello",
                             "--nats", stack.url, cwd=tmp_path)
    line = one_line(err)
    assert code == 1 and "cannot import 'mypkg.nothing'" in line and "searched:" in line
    assert str(tmp_path) in line


# -- submitting ----------------------------------------------------------------------------

async def test_a_job_id_submitted_again_with_another_body_says_how_it_differs(
        make_stack: StackFactory, client: Client, tmp_path: Path) -> None:
    await make_stack(workers=1)
    url = url_of(client)
    first = await client.submit_result("echo", {"a": 1}, job_id="order-1")
    assert (first.duplicate, first.differs) == (False, ())
    same = await client.submit_result("echo", {"a": 1}, job_id="order-1")
    assert (same.job_id, same.differs) == ("order-1", ())  # the same submission again
    other = await client.submit_result("echo", {"a": 2}, job_id="order-1", priority=3)
    assert (other.duplicate, other.differs) == (True, ("args", "priority"))
    # a plain request without a Nats-Msg-Id takes another path through the sentinel
    nc = await connect(url)
    body = orjson.dumps({"handler": "echo", "job_id": "order-1", "args": {"a": 9}})
    reply = orjson.loads((await nc.request(S.submit_subject("default"), body, 10)).data)
    await nc.close()
    assert reply == {"job_id": "order-1", "duplicate": True, "differs": ["args"]}
    code, out, err = await cli(url, "submit", "echo", "--job-id", "order-1", "--args",
                               '{"a": 3}', "--json")
    assert code == 0 and json.loads(out)["differs"] == ["args"]
    assert err.startswith("warning: job order-1 exists and was submitted with other args")
    code, out, err = await cli(url, "submit", "echo", "--job-id", "order-1", "--args",
                               '{"a": 1}')
    assert (code, out.strip(), err) == (0, "order-1", "")  # an idempotent retry: silent
    job = await client.wait("order-1", timeout=30)
    assert job.result == {"a": 1}  # the job keeps its first submission


async def test_args_from_a_file_or_stdin_up_to_the_submission_limit(
        make_stack: StackFactory, client: Client, tmp_path: Path) -> None:
    await make_stack(workers=1)
    url = url_of(client)
    big = {"blob": "x" * 250_000}  # more than a command line holds
    (tmp_path / "args.json").write_text(json.dumps(big))
    code, out, err = await cli(url, "submit", "echo", "--args", f"@{tmp_path / 'args.json'}",
                               "--wait", "--json")
    assert code == 0 and json.loads(out)["result"] == big, err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "submit", "echo", "--args", "-", "--wait",
        "--json", "--nats", url, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out_b, err_b = await asyncio.wait_for(proc.communicate(b'{"via": "stdin"}'), 60)
    assert proc.returncode == 0 and json.loads(out_b)["result"] == {"via": "stdin"}, err_b
    code, out, err = await cli(url, "submit", "echo", "--args", "@/no/such/file")
    line = one_line(err)
    assert code == 1 and "--args @/no/such/file: cannot read" in line, line


async def test_a_cancel_reason_is_kept_in_cancelled(make_stack: StackFactory,
                                                   client: Client) -> None:
    await make_stack(workers=1, concurrency=1)
    running = await client.submit("sleep", {"seconds": 30})
    queued = await client.submit("sleep", {"seconds": 30})

    async def is_running() -> bool:
        return (await client.status(running)).state == "running"
    await wait_until(is_running, 20, "the first job to run")
    await client.cancel(queued, reason="not needed after all")
    await client.cancel(running, reason="wrong input")
    for job_id, reason in ((queued, "not needed after all"), (running, "wrong input")):
        assert (await client.wait(job_id, timeout=30)).state == "cancelled"
        cancelled = [e for e in await client.history(job_id) if e.type == "cancelled"]
        assert [e.data["reason"] for e in cancelled] == [reason]


async def test_one_rule_and_one_message_for_job_ids(make_stack: StackFactory,
                                                    client: Client) -> None:
    await make_stack(workers=1)
    url = url_of(client)
    rule = "a job id is 1-64 characters of A-Z a-z 0-9 _ -"
    code, out, _ = await cli(url, "submit", "echo", "--job-id", "a:b", "--json")
    assert code == 2 and json.loads(out)["rejected"]["reason"] == f"invalid job id 'a:b': {rule}"
    for command in ("history", "job", "trace", "cancel"):
        code, _, err = await cli(url, command, "a:b")
        assert code == 1 and one_line(err) == f"error: invalid job id 'a:b': {rule}", err
    code, _, err = await cli("http://127.0.0.1:8222", "history", "j1")
    assert code == 1 and "the scheme is http://, NATS speaks nats://" in one_line(err)


async def test_the_readme_python_example_runs_as_written(make_stack: StackFactory,
                                                         client: Client) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    assert "asyncio.run(main())" in code
    await make_stack(workers=1)
    url = url_of(client)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code.replace("nats://127.0.0.1:4222", url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[:2] == [
        "succeeded {'x': 1}", "['submitted', 'started', 'succeeded']"]
