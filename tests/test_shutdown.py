"""Shutting down: a stop signal while a service is still starting cancels the start cleanly
(no kill by the signal's default action, no child processes left), and a loop that swallows
its cancellation (nats-py's flush does: ``except CancelledError: pass``) cannot keep a
worker from draining and recording that it left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jetflow import Client
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.runtime import Interrupted, Signals, cancel_and_wait, supervise
from jetflow.up import Stack
from jetflow.workers.worker import Worker
from tests.conftest import StackFactory, read_log, wait_until
from tests.test_up_and_connect import ROOT, alive, jetflow_env, refused_url


async def _swallow_cancellations(seconds: float) -> None:
    """Sleep ``seconds``, ignoring every cancellation meanwhile, as nats-py's flush does."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(until - loop.time())


async def test_cancel_and_wait_ends_a_task_that_swallowed_its_cancellation() -> None:
    async def stubborn() -> None:
        while True:
            await _swallow_cancellations(0.3)  # swallows the first cancel, not the one after
            await asyncio.sleep(0.3)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_and_wait([task], again_s=0.5), 5.0)
    assert task.cancelled()


async def test_supervise_ends_a_loop_that_returned_because_its_service_stops() -> None:
    calls = 0

    async def loop() -> None:
        nonlocal calls
        calls += 1

    await asyncio.wait_for(supervise("x", loop, restart_delay_s=0.01,
                                     finished=lambda: calls >= 3), 5.0)
    assert calls == 3


async def test_a_signal_while_starting_cancels_the_start_and_its_cleanup_runs() -> None:
    cleaned = asyncio.Event()

    async def slow_start() -> str:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.set()
        return "never"

    loop = asyncio.get_running_loop()
    loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    with Signals() as caught, pytest.raises(Interrupted) as raised:
        await asyncio.wait_for(caught.before(slow_start()), 10.0)
    assert raised.value.signal == signal.SIGTERM and cleaned.is_set()


async def test_a_start_that_ends_first_is_returned_and_a_later_signal_waited_for() -> None:
    async def quick() -> int:
        return 7

    loop = asyncio.get_running_loop()
    with Signals() as caught:
        assert await caught.before(quick()) == 7
        loop.call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(caught.wait(), 10.0) == signal.SIGTERM


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(("service", "sig"), [
    ("worker", signal.SIGTERM), ("sentinel", signal.SIGTERM), ("projector", signal.SIGTERM),
    ("worker", signal.SIGHUP),  # its terminal closed
])
async def test_a_service_stopped_while_waiting_for_nats_exits_at_once_and_cleanly(
        service: str, sig: signal.Signals, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", service, "--nats", refused_url(),
        *(["--db", str(tmp_path / "p.sqlite")] if service == "projector" else []),
        cwd=ROOT, env=jetflow_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        said = b""
        while b"waiting up to" not in said:  # it has started, and waits for the server
            said += await asyncio.wait_for(proc.stderr.readline(), 30)
        children = _children(proc.pid)
        if service == "worker":
            assert children, "the worker's child pool should be running while it waits"
        proc.send_signal(sig)
        err = await asyncio.wait_for(proc.stderr.read(), 10)
        assert await asyncio.wait_for(proc.wait(), 5) == 128 + sig, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert f"stopped: {sig.name} before the service was ready".encode() in err
    assert b"Traceback" not in err, err.decode()
    await asyncio.sleep(0.5)
    assert not [pid for pid in children if alive(pid)], "child processes left behind"


async def test_a_worker_whose_loop_swallows_cancellations_still_drains_and_leaves(
        server: EmbeddedServer) -> None:
    worker = Worker(server.url, handlers="echo", lease_s=3.0, grace_s=1.0)

    async def work_loop_like_nats_py() -> None:
        # a fetch, then an unsubscribe, each ignoring a cancellation that lands in it
        while not worker._draining:
            await _swallow_cancellations(0.05)
        await _swallow_cancellations(0.3)

    worker._work_loop = work_loop_like_nats_py  # type: ignore[method-assign]
    await worker.start()
    await asyncio.wait_for(worker.drain(), 15.0)
    left = await read_log(server.url, ["jf.worker.*.left"])
    assert [e.id for e in left] == [worker.worker_id]
    assert all(task.done() for task in worker._tasks)


@contextlib.asynccontextmanager
async def _worker_in_its_own_group(stack: Stack, *args: str
                                   ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`jetflow worker` leading its own process group, as a shell's foreground job does,
    once it has joined; its group is killed at the end, whatever the test left."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "worker", "--nats", stack.url, "--handlers",
        "sleep", "--concurrency", "1", *args, cwd=ROOT, env=jetflow_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        await stack.wait_for_workers(1, 0, 30)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


async def _running_child(client: Client, job_id: str, worker: int) -> int:
    """The pid of the child process of ``worker`` once ``job_id`` runs there."""
    async def running() -> bool:
        return (await client.status(job_id)).state == "running"
    await wait_until(running, 30, f"{job_id} running")
    (child,) = _children(worker)
    return child


async def test_ctrl_c_in_a_terminal_drains_instead_of_failing_the_running_job(
        make_stack: StackFactory, client: Client) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group, children included:
    the job must finish within the grace period, not die of KeyboardInterrupt."""
    stack = await make_stack(workers=0)
    async with _worker_in_its_own_group(stack, "--grace", "30") as proc:
        job_id = await client.submit("sleep", {"seconds": 2.0}, max_attempts=1)
        await _running_child(client, job_id, proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        job = await client.wait(job_id, timeout=30)
        assert (job.state, job.attempt) == ("succeeded", 1), job.error
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    left = await read_log(stack.url, ["jf.worker.*.left"])
    assert [e.data["reason"] for e in left] == ["drained"]


async def test_a_busy_child_dies_with_its_worker(make_stack: StackFactory,
                                                 client: Client) -> None:
    """An orphan would go on running a job whose lease lapses and that then runs again
    elsewhere: the child of a worker killed with -9 is killed too."""
    stack = await make_stack(workers=0)
    async with _worker_in_its_own_group(stack) as proc:
        job_id = await client.submit("sleep", {"seconds": 60.0})
        child = await _running_child(client, job_id, proc.pid)
        proc.kill()
        await proc.wait()

        async def gone() -> bool:
            return not alive(child)
        await wait_until(gone, 10, "the busy child to die with its worker")


async def test_a_second_stop_signal_hands_the_running_job_back_at_once(
        make_stack: StackFactory, client: Client) -> None:
    stack = await make_stack(workers=0)
    async with _worker_in_its_own_group(stack, "--grace", "120") as proc:
        job_id = await client.submit("sleep", {"seconds": 120.0}, max_attempts=1)
        await _running_child(client, job_id, proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        said = b""
        while b"draining" not in said:
            said += await asyncio.wait_for(proc.stderr.readline(), 30)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)  # not the 120 s of grace
        assert proc.returncode == 0, err.decode()
    history = await client.history(job_id)
    handback = history[-1]
    assert handback.type == "handed_back", history
    assert (await client.status(job_id)).attempt == 1  # the hand-back used up no attempt
    left = await read_log(stack.url, ["jf.worker.*.left"])
    assert [e.data["reason"] for e in left] == ["drained"]


async def _up_in_its_own_group(tmp_path: Path, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetflow.cli", "up", "--data", str(tmp_path / "data"), "--port",
        str(port), "--workers", "1", cwd=ROOT, env=jetflow_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    banner = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert banner.startswith(b"jetflow is up"), banner
    return proc


@pytest.mark.parametrize("presses", [1, 2])
async def test_ctrl_c_on_up_drains_its_worker_and_twice_hands_the_job_back(
        tmp_path: Path, presses: int) -> None:
    """A terminal's Ctrl-C reaches `up` alone (its services have sessions of their own):
    once, the running job finishes and the worker records leaving; twice, it is handed
    back at once. Either way every process `up` started is gone."""
    from jetflow import connect as client_connect
    from tests.test_up_and_connect import free_port

    port = free_port()
    proc = await _up_in_its_own_group(tmp_path, port)
    started = _children(proc.pid)
    client = await client_connect(f"nats://127.0.0.1:{port}")
    try:
        seconds = 3.0 if presses == 1 else 120.0
        job_id = await client.submit("sleep", {"seconds": seconds}, max_attempts=1)

        async def running() -> bool:
            return (await client.status(job_id)).state == "running"
        await wait_until(running, 30, "the job to run")
        os.killpg(proc.pid, signal.SIGINT)
        if presses == 2:
            assert proc.stdout is not None
            said = b""
            while b"Ctrl-C again" not in said:
                said += await asyncio.wait_for(proc.stdout.readline(), 10)
            await asyncio.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        for pid in [proc.pid, *started]:  # what a failing `up` could leave (own sessions)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await client.close()
    await asyncio.sleep(0.5)
    assert not [pid for pid in started if alive(pid)], "processes of `up` left running"
    server = EmbeddedServer(tmp_path / "data", port=port)  # its store, to read the log
    async with server:
        history = await read_log(server.url, [f"jf.job.{job_id}.>"])
        left = await read_log(server.url, ["jf.worker.*.left"])
    if presses == 1:
        assert history[-1].type == "succeeded", [e.type for e in history]
    else:
        assert history[-1].type == "handed_back"
    assert [e.data["reason"] for e in left] == ["drained"]


async def test_services_of_an_up_killed_with_9_stop_gracefully(tmp_path: Path) -> None:
    """Nothing stops them in order then, but each is sent SIGTERM as `up` dies: the worker
    still drains and records leaving, and no service is left running."""
    from tests.test_up_and_connect import free_port

    port = free_port()
    proc = await _up_in_its_own_group(tmp_path, port)
    started = _children(proc.pid)
    services = [pid for pid in started
                if b"jetflow.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    try:
        assert len(services) == 3, started
        proc.kill()
        await proc.wait()

        async def all_gone() -> bool:
            return not [pid for pid in services if alive(pid)]
        await wait_until(all_gone, 30, "the services to stop after `up` died")
        left = await read_log(f"nats://127.0.0.1:{port}", ["jf.worker.*.left"])
        assert [e.data["reason"] for e in left] == ["drained"]
    finally:
        for pid in started:  # the nats-server it started, which is no Python service
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_stop_signal_sent_to_a_busy_child_is_left_to_its_worker(
        make_stack: StackFactory, client: Client) -> None:
    """systemd's default KillMode signals every process of the unit: the child goes on
    with its job, which the worker (draining) lets finish."""
    stack = await make_stack(workers=0)
    async with _worker_in_its_own_group(stack) as proc:
        job_id = await client.submit("sleep", {"seconds": 2.0}, max_attempts=1)
        child = await _running_child(client, job_id, proc.pid)

        async def catches() -> bool:  # past its start-up (slow on a loaded machine)
            return _catches(child, signal.SIGTERM) and _catches(child, signal.SIGINT)
        await wait_until(catches, 30, "the child to have its signal handlers")
        os.kill(child, signal.SIGTERM)
        os.kill(child, signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        job = await client.wait(job_id, timeout=30)
        assert (job.state, job.attempt) == ("succeeded", 1), job.error
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()


async def test_an_idle_worker_stops_without_a_word_of_warning(
        make_stack: StackFactory) -> None:
    stack = await make_stack(workers=0)
    async with _worker_in_its_own_group(stack) as proc:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert b"Warning" not in err and b"Traceback" not in err, err.decode()


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_handlers_own_subprocess_ends_with_its_job(
        make_stack: StackFactory, client: Client, tmp_path: Path, how: str) -> None:
    """A job stopped by cancel or its run timeout leaves nothing its handler started."""
    stack = await make_stack(workers=0)
    await stack.add_worker("spawner=examples.handlers:subprocess_sleep")
    await stack.wait_for_workers(1, 0, 30)
    pid_file = tmp_path / "pid"
    job_id = await client.submit("spawner", {"seconds": 60, "pid_file": str(pid_file)},
                                 max_attempts=1, timeout_s=1.5 if how == "timeout" else None)

    async def spawned() -> bool:
        return pid_file.exists() and pid_file.read_text().isdigit()
    await wait_until(spawned, 30, "the handler's subprocess")
    grandchild = int(pid_file.read_text())
    if how == "cancel":
        await client.cancel(job_id)
    job = await client.wait(job_id, timeout=30)
    assert job.state == ("cancelled" if how == "cancel" else "dead_lettered")

    async def gone() -> bool:
        return not alive(grandchild)
    await wait_until(gone, 10, "the handler's subprocess to be killed with its job")
