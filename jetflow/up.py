"""The whole system as real processes: nats-server (unless a URL is given), a sentinel,
workers and the projector, each ``python -m jetflow.cli <service>``. ``jetflow up``, the
demo, the benchmarks and the end-to-end tests all run it the same way; only ``jetflow up``
asks for ``restart=True`` (the fault tests kill services and expect them to stay dead)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Protocol

from nats.aio.msg import Msg

from jetflow.adapters.bus import Tail, connect
from jetflow.adapters.local_auth import LocalAuth
from jetflow.adapters.local_stacks import register, unregister
from jetflow.adapters.nats_server import EmbeddedServer, ServerError
from jetflow.adapters.natsclient import Client
from jetflow.adapters.runtime import STOP_WITH_PARENT_ENV
from jetflow.adapters.tls import TlsFiles
from jetflow.core import subjects as S
from jetflow.core.codec import dumps, loads
from jetflow.core.fleet import DEFAULT_CONCURRENCY
from jetflow.core.retry import RetryPolicy, compute_backoff

__all__ = ["Stack", "Service", "StartError", "restart_delay", "exit_description"]

log = logging.getLogger("jetflow.stack")

# A service that exits on its own is restarted after 1 s, 2 s, 4 s... at most 30 s; one
# that had run for STABLE_S before exiting starts again from 1 s.
RESTART_BACKOFF = RetryPolicy(base_s=1.0, factor=2.0, cap_s=30.0, jitter=0.0)
STABLE_S = 60.0
DEFAULT_HANDLERS = "echo,sleep,fail,@jetflow.examples.workflows.handlers"
WORKER_STOP_S = 45.0  # a worker's grace (30 s by default) and its hand-back, then SIGKILL


def _last_line(path: Path) -> str:
    """The last non-empty line of a service's log (why it stopped, usually)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(unreadable)"
    return _last_line_of(text) or "(empty)"


def _last_line_of(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else ""


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a service that exited ``failures`` times in a row."""
    return compute_backoff(failures, RESTART_BACKOFF, rand=0.5)


def exit_description(code: int) -> str:
    """``exit code 1``, ``killed by SIGKILL``: how a process ended, from its return code."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class StartError(RuntimeError):
    """A service ended while the stack was starting: a configuration it cannot run
    (an unknown handler, a module that does not import...). Nothing is restarted."""


class Restartable(Protocol):
    """What :meth:`Stack._keep_running` restarts: a service or the embedded server."""

    name: str

    @property
    def log_path(self) -> Path: ...

    @property
    def pid(self) -> int: ...

    async def exited(self) -> int: ...

    async def start(self) -> object: ...


class Service:
    """One service process, its output in ``<data>/logs/<name>.log``."""

    def __init__(self, name: str, args: list[str], url: str, log_dir: Path,
                 env: dict[str, str] | None = None,
                 before_start: Callable[[Service], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.before_start = before_start  # on every start: a worker's fresh identity
        self.args = args
        self.url = url
        self.log_path = log_dir / f"{name}.log"
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> Service:
        """Start the process (again, after it exited: its log is appended to)."""
        if self.before_start is not None:
            await self.before_start(self)
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "jetflow.cli", *self.args, "--nats", self.url]
        # Its own session: Ctrl-C in the terminal of `jetflow up` reaches `up` alone, which
        # stops the services in order (SIGTERM once; a second Ctrl-C: SIGTERM again, and a
        # draining worker hands its jobs back at once), not all of them at the same moment.
        # It is sent SIGTERM should this process die without stopping it (kill -9).
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env={**os.environ, **self.env, STOP_WITH_PARENT_ENV: str(os.getpid())},
            start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def kill(self) -> None:
        """kill -9, and reap."""
        self.signal(signal.SIGKILL)
        await self.wait(10.0)

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        self.signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()
        finally:
            if self.proc.returncode is not None:
                self._close_log()

    async def exited(self) -> int:
        """Wait, without a bound, until the process ends; its return code."""
        assert self.proc is not None
        code = await self.proc.wait()
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log:
            self._log.close()
            self._log = None


class Stack:
    def __init__(self, *, data_dir: Path, port: int = 4222, nats_url: str | None = None,
                 workers: int = 2, handlers: str = DEFAULT_HANDLERS,
                 concurrency: int = DEFAULT_CONCURRENCY,
                 durable: bool = False, lease_s: float = 15.0, projector: bool = True,
                 worker_args: list[str] | None = None,
                 sentinel_args: list[str] | None = None, restart: bool = False,
                 log_level: str | None = None, log_format: str | None = None,
                 auth: bool = False, tls: bool | TlsFiles = False) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.server = None if nats_url else EmbeddedServer(self.data_dir, port=port,
                                                           durable=durable)
        # each service with its own credentials on the embedded server (see local_auth)
        if tls and not (auth and self.server):
            raise StartError("--tls is for the server `jetflow up` starts, with credentials: "
                             "drop --insecure (or --nats)")
        self.auth = LocalAuth(self.data_dir, self.server, tls=tls) \
            if auth and self.server else None
        self._url = nats_url
        self.n_workers = workers
        self.handlers = handlers
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.with_projector = projector
        self.worker_args = worker_args or []
        self.sentinel_args = sentinel_args or []
        self.sentinels: list[Service] = []
        self.workers: list[Service] = []
        self.projector: Service | None = None
        self.restart = restart
        self.log_level = log_level
        self.log_format = log_format
        self._starting = False
        self._keepers: list[asyncio.Task[None]] = []
        self._entry: Path | None = None  # this stack in the local registry (local_stacks)
        self._minter: Client | None = None  # answers S.LOCAL_WORKER

    @property
    def url(self) -> str:
        return self.server.url if self.server else str(self._url)

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    async def start(self, ready_timeout_s: float = 30.0) -> Stack:
        """Start everything and wait until it is ready. A service that ends meanwhile
        is a :class:`StartError` (its log's last line says why); what ``restart`` asks
        for begins once all is up, so a configuration that cannot run is said once
        instead of being restarted for ever."""
        if self.server:
            if self.auth:
                self.auth.prepare()
            await self.server.start()
            if self.auth:
                self.auth.started()
                await self._serve_local()
        head = await self._events_head()
        self._starting = True
        await self.add_sentinel()
        for _ in range(self.n_workers):
            await self.add_worker()
        if self.with_projector:
            self.projector = await self._launch(Service(
                "projector", ["projector", "--db", str(self.data_dir / "projections.sqlite"),
                              *self._common()], self.url, self.log_dir,
                self._env("projector")))
        await self.wait_for_workers(self.n_workers, head, ready_timeout_s)
        await self.wait_for_sentinel(ready_timeout_s)
        self._starting = False
        if self.restart:
            kept: list[Restartable] = [*([self.server] if self.server else []),
                                       *self.services()]
            for svc in kept:
                self._keep(svc)
        return self

    async def _serve_local(self) -> None:
        """Be found by the commands run on this machine, and give a worker started by
        hand (``jetflow worker`` beside ``jetflow up``) an identity of its own."""
        self._entry = register(self.url, self.data_dir)
        self._minter = await self.connect()
        await self._minter.subscribe(S.LOCAL_WORKER, cb=self._mint_worker)

    async def _mint_worker(self, msg: Msg) -> None:
        assert self.auth is not None
        try:
            asked = loads(msg.data).get("id") if msg.data else None
            worker_id = S.check_token(asked, "worker id") if asked else \
                f"worker-{secrets.token_hex(4)}"
            user = await self.auth.add_worker(worker_id)
            reply: dict[str, object] = {"worker_id": worker_id,
                                        "context": str(self.auth.context_of(user))}
        except Exception as exc:  # noqa: BLE001 - said to the asker
            reply = {"error": str(exc)}
        if msg.reply:
            await msg.respond(dumps(reply))

    async def connect(self) -> Client:
        """A connection of ``up`` itself (admin, when each role has its credentials)."""
        return await connect(self.url, credentials=self.auth.credentials("admin")
                             if self.auth else None)

    def _env(self, role: str) -> dict[str, str]:
        return self.auth.env(role) if self.auth else {}

    def _common(self) -> list[str]:
        """What every service is started with besides its own arguments."""
        return [*(["--log-level", self.log_level] if self.log_level else []),
                *(["--log-format", self.log_format] if self.log_format else [])]

    def _check_started(self) -> None:
        """While starting: raise :class:`StartError` if a service has ended."""
        for svc in self.services():
            if not svc.running and svc.proc is not None:
                code = svc.proc.returncode
                assert code is not None
                raise StartError(f"{svc.name} ended while starting ({exit_description(code)}):"
                                 f" {_last_line(svc.log_path)} (its log: {svc.log_path})")

    async def wait_for_sentinel(self, timeout_s: float = 30.0) -> None:
        """Wait until a sentinel answers on the ping subject (it has caught up)."""
        nc = await self.connect()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._starting:
                    self._check_started()
                try:
                    await nc.request(S.SENTINEL_PING, b"", timeout=0.5)
                    return
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no sentinel answered in {timeout_s:g}s; see "
                                           f"{self.log_dir}") from None
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def add_sentinel(self) -> Service:
        name = f"sentinel-{len(self.sentinels) + 1}"
        svc = await self._launch(Service(name, ["sentinel", "--lease", str(self.lease_s),
                                                *self._common(), *self.sentinel_args],
                                         self.url, self.log_dir, self._env("sentinel")))
        self.sentinels.append(svc)
        return svc

    async def add_worker(self, handlers: str | None = None, *extra: str) -> Service:
        name = f"worker-{len(self.workers) + 1}"
        args = ["worker", "--handlers", handlers or self.handlers, "--data", str(self.data_dir),
                "--concurrency",
                str(self.concurrency), "--lease", str(self.lease_s), *self._common(),
                *self.worker_args, *extra]
        svc = await self._launch(Service(
            name, args, self.url, self.log_dir,
            before_start=self.auth.new_worker if self.auth else None))
        self.workers.append(svc)
        return svc

    async def _launch(self, svc: Service) -> Service:
        await svc.start()
        if self.restart and not self._starting:  # added later: kept running at once
            self._keep(svc)
        return svc

    def _keep(self, svc: Restartable) -> None:
        self._keepers.append(asyncio.create_task(self._keep_running(svc),
                                                 name=f"keep-{svc.name}"))

    async def _keep_running(self, svc: Restartable) -> None:
        """Restart ``svc`` (a service, or the embedded nats-server, which restarts on its
        port and store: the services reconnect by themselves) each time it exits, after a
        backoff; :meth:`stop` cancels this before stopping anything, so a shutdown restarts
        nothing."""
        failures = 0
        while True:
            started, pid = time.monotonic(), svc.pid
            code = await svc.exited()
            failures = 1 if time.monotonic() - started >= STABLE_S else failures + 1
            delay = restart_delay(failures)
            times = f" ({failures} times in a row)" if failures > 1 else ""
            log.error("%s (pid %d) exited unexpectedly%s: %s; restarting it in %gs. Its log "
                      "(%s) ends: %s", svc.name, pid, times, exit_description(code), delay,
                      svc.log_path, _last_line(svc.log_path))
            while True:
                await asyncio.sleep(delay)
                try:
                    await svc.start()
                    break
                except (OSError, ServerError) as exc:  # one more failure, and try again
                    failures += 1
                    delay = restart_delay(failures)
                    log.error("could not restart %s (%d times in a row): %s; trying again in "
                              "%gs", svc.name, failures, _last_line_of(str(exc)), delay)
            log.warning("%s restarted (pid %d)", svc.name, svc.pid)

    async def _events_head(self) -> int:
        nc = await self.connect()
        try:
            from jetflow.adapters.bus import ensure_buckets, ensure_streams

            js = nc.jetstream()
            await ensure_streams(js)
            await ensure_buckets(js)
            return (await js.stream_info(S.EVENTS_STREAM)).state.last_seq
        finally:
            await nc.close()

    async def wait_for_workers(self, count: int, after_seq: int, timeout_s: float) -> None:
        """Wait until ``count`` workers joined after stream sequence ``after_seq``."""
        nc = await self.connect()
        tail = Tail(nc.jetstream(), S.EVENTS_STREAM, start_seq=after_seq + 1,
                    filter_subjects=[f"{S.PREFIX}.worker.*.joined"], idle_s=0.2)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        try:
            async for batch in tail.batches():
                seen |= {m.subject.split(".")[2] for m in batch}
                if len(seen) >= count:
                    return
                if self._starting:
                    self._check_started()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(seen)} of {count} workers joined in "
                                       f"{timeout_s:g}s; see {self.log_dir}")
        finally:
            await tail.close()
            await nc.close()

    def services(self) -> list[Service]:
        return [*self.workers, *self.sentinels, *([self.projector] if self.projector else [])]

    async def stop(self) -> None:
        unregister(self._entry)
        self._entry = None
        if self._minter is not None:
            with contextlib.suppress(Exception):
                await self._minter.close()
            self._minter = None
        keepers, self._keepers = self._keepers, []
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        await asyncio.gather(*(svc.stop(WORKER_STOP_S) for svc in self.workers))
        await asyncio.gather(*(svc.stop() for svc in self.services()))
        if self.server:
            with contextlib.suppress(Exception):
                await self.server.stop()

    def hurry(self) -> None:
        """During :meth:`stop`: SIGTERM once more to the workers still draining, which
        hand their running jobs back at once."""
        for svc in self.workers:
            svc.signal(signal.SIGTERM)

    async def __aenter__(self) -> Stack:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
