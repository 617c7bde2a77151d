"""The commands that run jetflow: ``up`` (everything, via :mod:`jetflow.up`) and each
service on its own (``sentinel``, ``worker``, ``projector``). A service is imported only
by the command that runs it."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jetflow.adapters.bus import BusError
from jetflow.adapters.runtime import Signals
from jetflow.cli.options import (
    DEFAULT_DATA,
    PROJECTION_FILE,
    CommandError,
    common_options,
    csv,
    data_option,
    db_path,
    positive_int,
    seconds,
    seconds_or_zero,
)
from jetflow.core.fleet import DEFAULT_CONCURRENCY
from jetflow.up import DEFAULT_HANDLERS

if TYPE_CHECKING:
    from jetflow.adapters.tls import TlsFiles
    from jetflow.core.retry import RetryPolicy
    from jetflow.up import Stack

__all__ = ["add_commands", "up_server", "SERVICES", "UP_PORT"]

SERVICE_NATS_WAIT_S = 30.0  # a service may start before its server; a command fails fast
UP_PORT = 4222
SERVICES = ("sentinel", "worker", "projector")


# A service catches SIGINT/SIGTERM/SIGHUP from before it starts: one that arrives while it
# starts cancels the start (which cleans up after itself) instead of killing the process;
# a second one while a worker drains (or `up` stops) hands the running jobs back at once.

async def _serve_until_signal(start: Coroutine[Any, Any, object],
                              stop: Callable[[], Coroutine[Any, Any, None]]) -> int:
    with Signals() as caught:
        await caught.before(start)
        await caught.wait()
    await stop()
    return 0


async def cmd_sentinel(a: argparse.Namespace) -> int:
    from jetflow.sentinel.service import Sentinel

    policy, per_queue = _retry_policies(a.retry)
    sentinel = Sentinel(a.nats, lease_s=a.lease, policy=policy, queue_policies=per_queue,
                        wait_nats_s=a.wait_nats)
    return await _serve_until_signal(sentinel.start(), sentinel.stop)


async def cmd_worker(a: argparse.Namespace) -> int:
    from jetflow.workers.worker import Worker

    worker = Worker(a.nats, handlers=a.handlers, queues=tuple(csv(a.queue)),
                    concurrency=a.concurrency, lease_s=a.lease, heartbeat_s=a.heartbeat,
                    grace_s=a.grace, prefetch=a.prefetch, memory_limit_mb=a.memory_limit,
                    wait_nats_s=a.wait_nats, plugins=a.plugins, data_dir=a.data,
                    keep_envs=a.keep_envs, worker_id=a.id)
    with Signals() as caught:
        await caught.before(worker.start())
        await caught.wait()
        hurry = asyncio.ensure_future(caught.wait(2))  # a second signal: hand back at once
        try:
            await worker.drain(hurry=hurry)
        finally:
            hurry.cancel()
    return 0


async def cmd_projector(a: argparse.Namespace) -> int:
    from jetflow.projections.projector import Projector

    projector = Projector(a.nats, db_path(a), wait_nats_s=a.wait_nats)
    return await _serve_until_signal(projector.start(), projector.stop)


async def cmd_up(a: argparse.Namespace) -> int:
    from jetflow.adapters.bus import Unreachable
    from jetflow.up import Stack

    env_url = os.environ.get("JETFLOW_NATS_URL")
    port, url, source = up_server(a.port, a.nats, env_url)
    tls = _up_tls(a)
    stack = Stack(data_dir=Path(a.data), port=port, nats_url=url, workers=a.workers,
                  handlers=a.handlers, concurrency=a.concurrency, durable=a.durable,
                  lease_s=a.lease, restart=True, log_level=a.log_level,
                  log_format=a.log_format, auth=not a.insecure, tls=tls)
    try:
        # (SIGHUP too: the services have sessions of their own, so a closed terminal
        # reaches `up` alone)
        with Signals() as caught:
            await caught.before(stack.__aenter__())  # a stop while starting stops it all
            try:
                _print_up_banner(a, stack.url, started=url is None, source=source,
                                 env_url=env_url)
                await caught.wait()
                print("stopping: running jobs may finish (Ctrl-C again to hand them back "
                      "at once)...", flush=True)
                await _stop_hurried(stack, caught)
            except BaseException:
                await stack.stop()
                raise
    except Unreachable as exc:
        hint = ("drop --nats to start one" if source == "--nats" else
                "pass --port (or unset JETFLOW_NATS_URL) to start one")
        raise BusError(f"cannot reach NATS at {exc.url}: {exc.reason}. It came from {source}, "
                       f"so `jetflow up` started no server: {hint}") from None
    return 0


async def _stop_hurried(stack: Stack, caught: Signals) -> None:
    """Stop the stack; a second signal meanwhile makes draining workers hand back now.
    Further signals are caught, so nothing interrupts the stop half way."""
    stopping = asyncio.ensure_future(stack.stop())
    hurry = asyncio.ensure_future(caught.wait(2))
    await asyncio.wait({stopping, hurry}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        print("handing running jobs back...", flush=True)
        stack.hurry()
    hurry.cancel()
    await stopping


def _print_up_banner(a: argparse.Namespace, url: str, *, started: bool, source: str,
                     env_url: str | None) -> None:
    where = "started here" if started else f"existing, from {source}"
    print(f"jetflow is up: NATS at {url} ({where}), data in {a.data}, {a.workers} "
          "worker(s). Ctrl-C to stop.", flush=True)
    if env_url and env_url != url:
        print(f"  note: JETFLOW_NATS_URL ({env_url}) is another server: other commands use "
              f"it unless given --nats {url}", flush=True)
    print(f"  submit: jetflow submit echo --args '{{\"x\": 1}}' --nats {url} --wait",
          flush=True)
    if started and not a.insecure:
        contexts = Path(a.data).resolve() / "contexts"
        print(f"  credentials: every service has its own role; contexts in {contexts}/ "
              f"(nats --context {contexts}/admin.json ...); commands run on this machine "
              "find them, anonymous clients may only submit and read"
              + ("; TLS with the CA in " + str(_up_tls_ca(a)) if a.tls else ""),
              flush=True)
    elif started:
        print("  --insecure: no credentials, anyone who reaches the server may do "
              "anything (local experiments only)", flush=True)


def _up_tls(a: argparse.Namespace) -> bool | TlsFiles:
    """``--tls``: the server's certificate given (all three files), else one made."""
    from jetflow.adapters.tls import TlsError, given_tls

    try:
        given = given_tls(a.tls_server_ca, a.tls_server_cert, a.tls_server_key)
    except TlsError as exc:
        raise CommandError(str(exc)) from None
    if given is not None:
        a.tls = True
        return given
    return bool(a.tls)


def _up_tls_ca(a: argparse.Namespace) -> Path:
    return Path(a.tls_server_ca).resolve() if a.tls_server_ca else \
        Path(a.data).resolve() / "tls" / "ca.pem"


def up_server(port: int | None, nats: str | None,
              env_url: str | None) -> tuple[int, str | None, str]:
    """Whether ``jetflow up`` starts a server: (port, URL of an existing server or None,
    where that choice came from). An explicit flag wins over JETFLOW_NATS_URL."""
    if port is not None and nats:
        raise SystemExit("error: jetflow up: --port starts a server and --nats uses an "
                         "existing one; pass only one of them")
    if port is not None:
        return port, None, "--port"
    if nats:
        return UP_PORT, nats, "--nats"
    if env_url:
        return UP_PORT, env_url, "JETFLOW_NATS_URL"
    return UP_PORT, None, "default"


def _retry_policies(specs: list[str]) -> tuple[RetryPolicy, dict[str, RetryPolicy]]:
    from jetflow.core.retry import RetryPolicy

    default, per_queue = RetryPolicy(), {}
    for spec in specs:
        queue, _, numbers = spec.rpartition("=")
        try:
            base, factor, cap = (float(x) for x in numbers.split(","))
        except ValueError:
            raise SystemExit(f"error: --retry {spec!r}: expected [QUEUE=]BASE,FACTOR,CAP") \
                from None
        policy = RetryPolicy(base_s=base, factor=factor, cap_s=cap)
        if queue:
            per_queue[queue] = policy
        else:
            default = policy
    return default, per_queue


# -- argument parsing ------------------------------------------------------------------------

def add_commands(sub: Any) -> None:
    _add_up(sub)
    _add_sentinel(sub)
    _add_worker(sub)
    _add_projector(sub)


def _add_up(sub: Any) -> None:
    p = sub.add_parser(
        "up", help="run nats-server, a sentinel, workers and the projector",
        description="Run the whole system until Ctrl-C/SIGTERM. The server: --port P starts "
                    "one on port P, even when JETFLOW_NATS_URL is set; --nats URL uses an "
                    "existing one and starts none (both together are an error); with "
                    "neither, JETFLOW_NATS_URL names an existing one if set, else one is "
                    f"started on port {UP_PORT}. A service that exits unexpectedly is logged "
                    "(name, exit code or signal, its log file) and restarted after 1 s, "
                    "then 2, 4... up to 30 s while it keeps failing (1 s again once it ran "
                    "for a minute); Ctrl-C/SIGTERM stops everything and restarts nothing.")
    common_options(p, nats_help="use this existing server or cluster; start none")
    p.add_argument("--port", type=int,
                   help=f"start the embedded server on this port ({UP_PORT}); wins over "
                        "JETFLOW_NATS_URL")
    data_option(p)
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes (2)")
    p.add_argument("--handlers", default=DEFAULT_HANDLERS,
                   help=f"handlers of each worker ({DEFAULT_HANDLERS}: the built-ins and the "
                        "example workflows' steps)")
    p.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                   help=f"jobs at once per worker: its child processes "
                        f"({DEFAULT_CONCURRENCY})")
    p.add_argument("--lease", type=seconds, default=15.0, help="worker lease in seconds (15)")
    p.add_argument("--durable", action="store_true",
                   help="fsync every write (sync_interval: always): survives power loss, "
                        "slower")
    p.add_argument("--insecure", action="store_true",
                   help="for local experiments only: no credentials and no roles, so any "
                        "client may append any event (by default each service gets its "
                        "own role, written under <data>/contexts/, and anonymous clients "
                        "may only submit and read)")
    p.add_argument("--tls", action="store_true",
                   help="serve TLS only, with a local CA and server certificate made under "
                        "<data>/tls/ (the contexts carry the CA)")
    p.add_argument("--tls-server-cert", metavar="FILE",
                   help="with --tls: serve this certificate (PEM) instead of making one")
    p.add_argument("--tls-server-key", metavar="FILE", help="... its private key (PEM)")
    p.add_argument("--tls-server-ca", metavar="FILE",
                   help="... and the CA that signed it, which the contexts trust")
    p.set_defaults(run=cmd_up)


def _service_options(p: argparse.ArgumentParser) -> None:
    common_options(p)
    p.add_argument("--wait-nats", type=seconds, default=SERVICE_NATS_WAIT_S, metavar="S",
                   help="at startup, wait this long for the NATS server "
                        f"({SERVICE_NATS_WAIT_S:g} s)")


def _add_sentinel(sub: Any) -> None:
    p = sub.add_parser("sentinel", help="run the control plane (one or more)")
    _service_options(p)
    p.add_argument("--lease", type=seconds, default=15.0,
                   help="declare a worker lost after this many silent seconds (15)")
    p.add_argument("--retry", action="append", default=[], metavar="[QUEUE=]BASE,FACTOR,CAP",
                   help="backoff: BASE seconds x FACTOR^n, at most CAP (default 1,2,300); "
                        "QUEUE= sets it for one queue; repeatable. A job's own 'retry' "
                        "field wins.")
    p.set_defaults(run=cmd_sentinel)


def _add_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker")
    _service_options(p)
    p.add_argument("--queue", default="default", help="queue(s) to serve, comma-separated")
    p.add_argument("--handlers", default=DEFAULT_HANDLERS,
                   help="handlers: built-in names, name=module:function, or @module (every "
                        f"one of its HANDLERS), comma-separated ({DEFAULT_HANDLERS})")
    p.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                   help=f"jobs at once: child processes ({DEFAULT_CONCURRENCY})")
    p.add_argument("--plugins", default="all", metavar="all|none|NAMES",
                   help="run jobs of deployed plugins: all (the default), none, or only "
                        "these (names separated by commas)")
    p.add_argument("--id", default=os.environ.get("JETFLOW_WORKER_ID"), metavar="ID",
                   help="this worker's id: the one its credentials are for, when each worker "
                        "has its own (env JETFLOW_WORKER_ID; default host-pid-random)")
    p.add_argument("--keep-envs", type=positive_int, default=8,
                   help="plugin environments kept (least recently used go first) (8)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"data directory: plugin sources, default plugin outputs "
                        f"(<data>/outputs/<plugin>/<output>/) (./{DEFAULT_DATA})")
    p.add_argument("--lease", type=seconds, default=15.0, help="lease announced (15 s)")
    p.add_argument("--heartbeat", type=seconds,
                   help="heartbeat interval (default: a quarter of the lease, at most 2 s)")
    p.add_argument("--prefetch", type=int,
                   help="offers buffered beyond the running slots (default: --concurrency); "
                        "0 gives strict priority at some cost in throughput")
    p.add_argument("--memory-limit", type=positive_int, metavar="MB",
                   help="address-space limit of each child process (MemoryError beyond it)")
    p.add_argument("--grace", type=seconds_or_zero, default=30.0,
                   help="on SIGTERM, wait this long for running jobs (30 s)")
    p.set_defaults(run=cmd_worker)


def _add_projector(sub: Any) -> None:
    p = sub.add_parser("projector", help="keep the SQLite projections up to date")
    _service_options(p)
    p.add_argument("--db", help=f"SQLite file (default <data>/{PROJECTION_FILE})")
    data_option(p)
    p.set_defaults(run=cmd_projector)


