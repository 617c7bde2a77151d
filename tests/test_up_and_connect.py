"""Connecting and `jetflow up`: a clear, fast error when nothing listens (services still
wait for a server that is starting), `up --port` starting its server whatever
JETFLOW_NATS_URL says, and `up` restarting a service that dies, but not on shutdown.
Real nats-server, real processes, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jetflow import connect as client_connect
from jetflow.adapters.bus import BusError, Unreachable, _unreachable_reason, connect
from jetflow.adapters.nats_server import EmbeddedServer, ServerError
from jetflow.cli.services import up_server
from jetflow.core import subjects as S
from jetflow.up import Stack, exit_description, restart_delay
from tests.conftest import wait_until
from tests.test_projections_e2e import caught_up, query

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"


def alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def jetflow_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JETFLOW_NATS_URL"}
    return {**env, **extra}


async def run_jetflow(*args: str, env: dict[str, str] | None = None,
                      timeout_s: float = 30.0) -> tuple[int, str, float]:
    """Run ``jetflow ARGS`` to the end: (exit code, stderr, seconds it took)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", *args, cwd=ROOT, env=env or jetflow_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:  # timed out: stop it (and what it started) first
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode(), time.monotonic() - started


# -- A: connecting ---------------------------------------------------------------------------

def test_a_refused_connection_is_said_in_words() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    assert _unreachable_reason(refused) == "connection refused (nothing listens on that port)"
    unknown = socket.gaierror(-2, "Name or service not known")
    assert _unreachable_reason(unknown) == "unknown host (Name or service not known)"
    assert _unreachable_reason(TimeoutError()) == "no answer within 2s"
    assert _unreachable_reason(None) == "no answer within 2s"
    assert _unreachable_reason(OSError(113, "No route to host")) == "no route to host"
    assert _unreachable_reason(RuntimeError()) == "RuntimeError"


async def test_a_connect_fails_fast_with_the_reason_when_nothing_listens() -> None:
    url = refused_url()
    started = time.monotonic()
    with pytest.raises(Unreachable) as caught:
        await connect(url)
    assert time.monotonic() - started < 2.5  # it was 10 s
    assert caught.value.reason == "connection refused (nothing listens on that port)"
    assert str(caught.value).startswith(f"cannot reach NATS at {url}: connection refused")


async def test_a_read_command_fails_fast_with_the_reason() -> None:
    code, err, took = await run_jetflow("history", "someid", "--nats", refused_url())
    assert code == 1, err
    assert "connection refused" in err, err
    assert took < 4.0, f"took {took:.1f}s: {err}"  # it was 10 s


async def test_a_connection_reconnects_forever_after_the_first_connect(
        tmp_path: Path) -> None:
    async with EmbeddedServer(tmp_path / "srv", port=0) as server:
        nc = await connect(server.url)
        try:
            await server.stop()
            await asyncio.sleep(2.5)  # longer than a first connect's bounded attempts
            await server.start()

            async def back() -> bool:
                return bool(nc.is_connected)
            await wait_until(back, 15, "the client to reconnect")
            await nc.flush(timeout=5)
        finally:
            await nc.close()


async def test_a_service_waits_for_a_server_that_starts_late(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "srv", port=free_port())
    sentinel = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "sentinel", "--nats", server.url, cwd=ROOT,
        env=jetflow_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(2.0)  # longer than a command waits
        assert sentinel.returncode is None, "the sentinel gave up on a server still starting"
        async with server:
            nc = await connect(server.url)
            try:
                async def answers() -> bool:
                    with contextlib.suppress(Exception):
                        await nc.request(S.SENTINEL_PING, b"", timeout=0.5)
                        return True
                    return False
                await wait_until(answers, 20, "the sentinel to answer its ping")
            finally:
                await nc.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            sentinel.terminate()
        _, err = await asyncio.wait_for(sentinel.communicate(), 20)
    assert "connection refused" in err.decode() and "waiting up to 30s" in err.decode()


# -- B: where `jetflow up` gets its server ----------------------------------------------------

def test_b_an_explicit_flag_wins_over_the_environment() -> None:
    env = "nats://10.0.0.1:4222"
    assert up_server(14333, None, env) == (14333, None, "--port")
    assert up_server(None, "nats://h:1", env) == (4222, "nats://h:1", "--nats")
    assert up_server(None, None, env) == (4222, env, "JETFLOW_NATS_URL")
    assert up_server(None, None, None) == (4222, None, "default")
    with pytest.raises(SystemExit, match="pass only one"):
        up_server(14333, "nats://h:1", None)


async def test_b_up_with_a_port_and_a_conflicting_flag_fails_at_once(tmp_path: Path) -> None:
    code, err, took = await run_jetflow("up", "--port", str(free_port()), "--nats",
                                        refused_url(), "--data", str(tmp_path))
    assert code == 1 and "pass only one of them" in err and took < 4.0, err


async def test_b_up_on_an_unreachable_env_server_says_why_and_how_to_start_one(
        tmp_path: Path) -> None:
    url = refused_url()
    code, err, took = await run_jetflow("up", "--data", str(tmp_path),
                                        env=jetflow_env(JETFLOW_NATS_URL=url))
    assert code == 1 and took < 4.0, err
    assert f"cannot reach NATS at {url}: connection refused" in err, err
    assert "came from JETFLOW_NATS_URL" in err and "pass --port" in err, err


class Up:
    """A real `jetflow up` child process; stderr (its log) goes to a file."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path, data: Path) -> None:
        self.proc, self.stderr, self.data = proc, stderr, data

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        """{pid: command line} of the processes `up` started."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                    found[int(stat.parent.name)] = cmd.decode(errors="replace")
        return found

    def service_pid(self, service: str) -> int | None:
        return next((pid for pid, cmd in self.children().items()
                     if f"jetflow.cli {service} " in cmd), None)


@contextlib.asynccontextmanager
async def jetflow_up(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                     before: list[str] | None = None) -> AsyncIterator[tuple[Up, str]]:
    """`jetflow [BEFORE] up ARGS` until its banner: (the process, the banner's first
    line)."""
    data, stderr = tmp_path / "data", tmp_path / "up.stderr"
    with stderr.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jetflow.cli", *(before or []), "up", "--data", str(data),
            "--workers", "1",
            *args, cwd=ROOT, env=env or jetflow_env(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=err_file)
    up = Up(proc, stderr, data)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("jetflow is up"), f"{line!r}\n{up.log()}"
        yield up, line
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)


async def test_b_up_with_a_port_starts_its_server_even_with_the_env_set(
        tmp_path: Path) -> None:
    port, elsewhere = free_port(), refused_url()
    async with jetflow_up(tmp_path, "--port", str(port),
                          env=jetflow_env(JETFLOW_NATS_URL=elsewhere)) as (up, line):
        assert line.startswith(f"jetflow is up: NATS at nats://127.0.0.1:{port} (started here)")
        nc = await connect(f"nats://127.0.0.1:{port}")
        await nc.request(S.SENTINEL_PING, b"", timeout=5)
        await nc.close()
    assert up.proc.returncode == 0, up.log()


# -- C: `jetflow up` keeps its services running -------------------------------------------------

def test_c_restart_backoff_doubles_to_30s() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert exit_description(-9) == "killed by SIGKILL"
    assert exit_description(3) == "exit code 3"


async def test_c_up_restarts_a_killed_projector_and_it_catches_up(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    async with jetflow_up(tmp_path, "--port", str(port)) as (up, _):
        first = up.service_pid("projector")
        assert first is not None, up.children()
        os.kill(first, signal.SIGKILL)

        async def replaced() -> bool:
            return up.service_pid("projector") not in (None, first)
        await wait_until(replaced, 10, "a new projector process")
        assert (f"projector (pid {first}) exited unexpectedly: killed by SIGKILL; restarting "
                f"it in 1s. Its log ({up.data.resolve() / 'logs' / 'projector.log'}) ends: "
                in up.log()), up.log()

        client = await client_connect(url)
        try:
            job_id = await client.submit("echo", {"after": "restart"})
            assert (await client.wait(job_id, timeout=30)).state == "succeeded"
        finally:
            await client.close()
        db = up.data / "projections.sqlite"
        await caught_up(db, url)
        assert query(db, "SELECT state FROM jobs WHERE job_id = ?", job_id) == [("succeeded",)]
        services = up.children()
    assert up.proc.returncode == 0, up.log()
    assert up.log().count("exited unexpectedly") == 1, up.log()
    assert len(services) == 4 and not [pid for pid in services if alive(pid)], services


async def test_c_up_restarts_its_killed_nats_server_and_the_services_carry_on(
        tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    def server_pid() -> int | None:
        return next((pid for pid, cmd in up.children().items() if "nats-server" in cmd), None)
    async with jetflow_up(tmp_path, "--port", str(port)) as (up, _):
        client = await client_connect(url)
        try:
            before = await client.submit("echo", {"before": "the crash"})
            assert (await client.wait(before, timeout=30)).state == "succeeded"
        finally:
            await client.close()
        first = server_pid()
        assert first is not None, up.children()
        services = {pid for pid, cmd in up.children().items() if "jetflow.cli" in cmd}
        os.kill(first, signal.SIGKILL)

        async def replaced() -> bool:
            return server_pid() not in (None, first)
        await wait_until(replaced, 15, "a new nats-server process")
        assert (f"nats-server (pid {first}) exited unexpectedly: killed by SIGKILL; "
                "restarting it in 1s" in up.log()), up.log()

        async def reachable() -> bool:
            with contextlib.suppress(BusError):
                await (await connect(url)).close()
                return True
            return False
        await wait_until(reachable, 15, "the restarted server to listen")
        client = await client_connect(url)
        try:
            after = await client.submit("echo", {"after": "the crash"})
            assert (await client.wait(after, timeout=30)).state == "succeeded"
            assert (await client.status(before)).state == "succeeded"  # the store was kept
        finally:
            await client.close()
        db = up.data / "projections.sqlite"
        await caught_up(db, url)
        assert sorted(query(db, "SELECT state FROM jobs")) == [("succeeded",)] * 2
        # the same three services: they reconnected, none had to be restarted
        assert {pid for pid, cmd in up.children().items() if "jetflow.cli" in cmd} == services
        assert len(services) == 3
    assert up.proc.returncode == 0, up.log()
    assert up.log().count("exited unexpectedly") == 1, up.log()


async def test_c_up_stopped_while_it_starts_stops_everything_it_started(
        tmp_path: Path) -> None:
    """SIGTERM once `up` has started its server and services but before it is ready: no
    process of the stack may be left running."""
    stderr = tmp_path / "up.stderr"
    with stderr.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jetflow.cli", "up", "--data", str(tmp_path / "data"),
            "--port", str(free_port()), "--workers", "2", cwd=ROOT, env=jetflow_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=err_file)
    up = Up(proc, stderr, tmp_path / "data")
    try:
        async def services_launched() -> bool:
            return sum("jetflow.cli" in cmd for cmd in up.children().values()) >= 2
        await wait_until(services_launched, 30, "up to launch its services")
        started = up.children()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode in (0, 128 + signal.SIGTERM), up.log()
    assert proc.returncode == 0 or b"jetflow is up" not in out  # 143: stopped before ready
    await asyncio.sleep(0.5)
    assert not [cmd for pid, cmd in started.items() if alive(pid)], started
    assert "Traceback" not in up.log(), up.log()


async def test_c_a_server_restart_that_fails_is_said_once_per_try_then_succeeds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The port is taken when the killed server should restart: one short line per failed
    try (not the exit again, not the server's whole log), and it restarts once it can."""
    caplog.set_level(logging.WARNING, logger="jetflow.stack")
    async with Stack(data_dir=tmp_path / "s", port=free_port(), workers=1, projector=False,
                     restart=True) as stack:
        assert stack.server is not None
        first = stack.server.pid
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            os.kill(first, signal.SIGKILL)
            await asyncio.sleep(0.3)
            squatter.bind(("127.0.0.1", stack.server.port))
            squatter.listen()

            async def failed_once() -> bool:
                return any("could not restart" in r.getMessage() for r in caplog.records)
            await wait_until(failed_once, 15, "a restart to fail on the taken port")

        async def restarted() -> bool:
            return any("nats-server restarted" in r.getMessage() for r in caplog.records)
        await wait_until(restarted, 30, "the server to restart once the port is free")
    said = [r.getMessage() for r in caplog.records]
    assert sum("exited unexpectedly" in m for m in said) == 1, said
    failures = [m for m in said if "could not restart" in m]
    assert failures[0].startswith("could not restart nats-server (2 times in a row): ")
    assert all("\n" not in m and len(m) < 500 for m in failures), failures


async def test_c_a_store_in_use_by_another_server_is_refused_by_name(tmp_path: Path) -> None:
    """Two nats-servers on one store corrupt it: the second is refused, naming the first
    (what an `up` killed with -9 leaves), whatever its port; once that one is gone, the
    store is free again."""
    first = await EmbeddedServer(tmp_path / "data", port=free_port()).start()
    try:
        assert first.proc is not None
        with pytest.raises(ServerError, match=f"in use by another nats-server \\(pid "
                                              f"{first.proc.pid}\\)"):
            await EmbeddedServer(tmp_path / "data", port=free_port()).start()
        code, err, _ = await run_jetflow("up", "--data", str(tmp_path / "data"), "--port",
                                         str(free_port()))
        assert code == 1 and err.count("\n") == 1, err
        assert f"in use by another nats-server (pid {first.proc.pid})" in err
    finally:
        await first.kill()
    async with EmbeddedServer(tmp_path / "data", port=free_port()) as again:
        await (await connect(again.url)).close()


async def test_c_a_stack_restarts_only_when_asked_and_never_on_stop(
        server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="jetflow.stack")
    async with Stack(data_dir=tmp_path / "plain", nats_url=server.url, workers=1,
                     projector=False) as plain:
        await plain.workers[0].kill()
        await asyncio.sleep(1.5)  # past the first restart delay
        assert not plain.workers[0].running
    async with Stack(data_dir=tmp_path / "kept", nats_url=server.url, workers=1,
                     projector=False, restart=True) as kept:
        first = kept.workers[0].pid
        await kept.workers[0].kill()

        async def restarted() -> bool:
            return kept.workers[0].running and kept.workers[0].pid != first
        await wait_until(restarted, 10, "the worker to be restarted")
    assert not any(svc.running for svc in kept.services())
    await asyncio.sleep(1.5)  # a restart scheduled by the shutdown would happen by now
    assert not any(svc.running for svc in kept.services())
    exits = [r.getMessage() for r in caplog.records if "exited unexpectedly" in r.getMessage()]
    assert len(exits) == 1 and exits[0].startswith(f"worker-1 (pid {first})"), exits


async def test_a_server_that_refuses_us_is_said_at_once_not_waited_for() -> None:
    """Wrong credentials are no absent server: no 30 s of waiting, no `jetflow up` hint."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","version":"2.10.0","proto":1,"headers":true,'
                     b'"max_payload":1048576,"auth_required":true}\r\n')
        await writer.drain()
        await reader.readline()
        writer.write(b"-ERR 'Authorization Violation'\r\n")
        await writer.drain()
        writer.close()

    fake = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(BusError, match="refused the connection: .*Authorization") as exc:
            await connect(f"nats://127.0.0.1:{port}", wait_s=10.0)
        assert not isinstance(exc.value, Unreachable)
        assert time.monotonic() - started < 5.0
    finally:
        fake.close()
