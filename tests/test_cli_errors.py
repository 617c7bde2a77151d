"""What the `jetflow` commands say when they cannot do what was asked: one line (JSON on
stdout with ``--json``), never a traceback: a server where no sentinel ever ran, no
sentinel answering, a URL that is no URL, arguments that are no JSON, a wait that ends
before the job does, a job that does not exist."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jetflow import Client
from jetflow.adapters.nats_server import EmbeddedServer, find_binary
from tests.conftest import StackFactory
from tests.test_projections_e2e import cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.e2e


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


async def test_a_server_where_no_sentinel_ever_ran(server: EmbeddedServer) -> None:
    """A bare nats-server: no streams, nothing listening on jetflow's subjects."""
    code, _, err = await cli(server.url, "history", "j1")
    assert code == 1 and "no JF_EVENTS stream" in one_line(err) and "jetflow up" in err
    code, out, err = await cli(server.url, "trace", "j1", "--json")
    assert code == 1 and err == "" and "no JF_EVENTS stream" in json.loads(out)["error"]
    code, _, err = await cli(server.url, "submit", "echo")
    line = one_line(err)
    assert code == 1 and "no jetflow sentinel is running" in line
    assert "nothing was submitted" in line
    code, out, err = await cli(server.url, "cancel", "j1", "--json")
    assert code == 1 and err == ""
    assert "nothing listens on jf.ctl.cancel" in json.loads(out)["error"]


async def test_no_sentinel_answering_a_cancel_is_one_line(client: Client) -> None:
    """The streams exist (a sentinel ran once) but none runs now."""
    code, _, err = await cli(client.nc.connected_url.geturl(), "retry", "j1")
    line = one_line(err)
    assert code == 1 and "nothing listens on jf.ctl.retry" in line
    assert "nothing was submitted" not in line


@pytest.mark.parametrize("url", ["nats://bad:url:x", "nats://:0"])
async def test_a_url_that_is_no_url_is_one_line(url: str) -> None:
    code, out, err = await cli(url, "history", "j1", "--json")
    assert code == 1 and err == "" and "is not a NATS URL" in json.loads(out)["error"]


async def test_submit_errors_with_json_are_json(make_stack: StackFactory) -> None:
    stack = await make_stack(workers=0)
    for args, expected in ((["--args", "{bad"], "--args is not valid JSON"),
                           (["--args", "[1]"], "--args must be a JSON object")):
        code, out, err = await cli(stack.url, "submit", "echo", *args, "--json")
        assert (code, err) == (1, "") and expected in json.loads(out)["error"]
        code, out, err = await cli(stack.url, "submit", "echo", *args)
        assert code == 1 and out == "" and expected in one_line(err)
    # a rejection says which job it was recorded as
    code, out, err = await cli(stack.url, "submit", "nope", "--json")
    answer = json.loads(out)
    assert code == 2 and answer["job_id"] and answer["rejected"]["code"] == "unknown_handler"


async def test_a_wait_that_ends_first_says_which_job_goes_on(make_stack: StackFactory) -> None:
    stack = await make_stack(workers=1)
    await stack.workers[0].stop()  # `echo` is known, and no worker runs it now
    code, out, err = await cli(stack.url, "submit", "echo", "--wait", "--wait-timeout", "1",
                               "--json")
    answer = json.loads(out)
    assert (code, err, answer["state"]) == (1, "", "queued")
    assert answer["error"].startswith(f"timed out: job {answer['job_id']} is still queued")
    code, out, err = await cli(stack.url, "submit", "echo", "--wait", "--wait-timeout", "1")
    assert code == 1 and "is still queued after 1s; it goes on" in one_line(err)


# -- every command, against a server it cannot use ----------------------------------------

READERS = [["submit", "echo"], ["cancel", "j1"], ["retry", "j1"], ["status"], ["workers"],
           ["jobs"], ["errors"], ["job", "j1"], ["history", "j1"], ["replay", "--db", "{tmp}/r"],
           ["replay", "--verify"], ["export", "--parquet", "{tmp}/pq"], ["trace", "j1"],
           ["workflow", "list"], ["workflow", "show", "w1"], ["workflows"],
           ["workflow", "register", str(EXAMPLES / "workflows" / "linear.yaml")],
           ["plugin", "list"],
           ["plugin", "deploy", str(EXAMPLES / "plugins" / "csv_to_parquet.py")],
           ["plugin", "retire", "p1"], ["logs", "j1"], ["logs", "j1", "-f"]]
SERVICES = [["sentinel", "--wait-nats", "1"], ["worker", "--wait-nats", "1"],
            ["projector", "--wait-nats", "1", "--data", "{tmp}/p"], ["up"]]


@pytest.fixture
async def plain_server(tmp_path: Path) -> AsyncIterator[str]:
    """A nats-server without JetStream."""
    proc = await asyncio.create_subprocess_exec(
        find_binary(), "-a", "127.0.0.1", "-p", "-1", stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    port = None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        assert line, "nats-server exited"
        if found := re.search(r"Listening for client connections on [^\s]*:(\d+)", line):
            port = found.group(1)
        if "Server is ready" in line:
            break
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.kill()
        await proc.wait()


SENTINEL_WAITERS = ("submit", "cancel", "retry")  # each waits 3 s for a sentinel


async def _every_command(url: str, tmp_path: Path, commands: list[list[str]],
                         modes: tuple[bool, ...]) -> dict[str, tuple[int, str, str]]:
    """Run each command (in each mode: with --json or not) from an empty directory: those
    that wait for a sentinel as processes of their own at once, the others one after
    another in one process (tests/cli_driver.py)."""
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    argvs = [[a.replace("{tmp}", str(tmp_path)) for a in c] + ["--json"] * j + ["--nats", url]
             for c in commands for j in modes]
    waiting = [a for a in argvs if a[0] in SENTINEL_WAITERS]
    rest = [a for a in argvs if a[0] not in SENTINEL_WAITERS]
    driver = asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.cli_driver", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc, *alone = await asyncio.gather(driver, *(cli(url, *a[:-2], cwd=work)
                                                   for a in waiting))
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(rest).encode()), 120)
    assert proc.returncode == 0, err.decode()
    results = [tuple(r) for r in json.loads(out)]
    return {" ".join(a[:-2]): r for a, r in zip([*rest, *waiting], [*results, *alone],
                                                  strict=True)}  # type: ignore[misc]


def _says_one_thing(name: str, result: tuple[int, str, str], *, as_json: bool) -> str:
    code, out, err = result
    assert code not in (0, 2), f"{name}: exit {code}\n{out}{err}"
    assert "Traceback" not in out + err, f"{name}:\n{err}"
    if as_json:
        assert err == "", f"{name}: stderr with --json: {err}"
        return str(json.loads(out)["error"])
    assert out == "", f"{name}: {out}"
    return one_line(err)


async def test_every_command_against_a_server_without_jetstream(plain_server: str,
                                                               tmp_path: Path) -> None:
    readers, services = await asyncio.gather(
        _every_command(plain_server, tmp_path, READERS, (False, True)),
        _every_command(plain_server, tmp_path, SERVICES, (False,)))
    results = readers | services
    for name, result in results.items():
        said = _says_one_thing(name, result, as_json=name.endswith("--json"))
        reads_no_log = name.split()[0] in ("submit", "cancel", "retry", "status", "workers",
                                           "jobs", "errors") or name.startswith("replay --v")
        assert reads_no_log or "JetStream is not enabled" in said, f"{name}: {said}"


async def test_every_command_against_a_server_without_jetflow(server: EmbeddedServer,
                                                              tmp_path: Path) -> None:
    """JetStream, but no jetflow stream (no sentinel ever ran): the services would
    create them, so only the commands that read or submit are tried."""
    results = await _every_command(server.url, tmp_path, READERS, (False, True))
    for name, result in results.items():
        said = _says_one_thing(name, result, as_json=name.endswith("--json"))
        if name.split()[0] in ("job", "history", "trace", "export") \
                or name.startswith("replay --db"):
            assert "no JF_EVENTS stream" in said, f"{name}: {said}"
