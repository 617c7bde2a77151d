"""The ``jetflow`` command line. Each command is one small function; services are imported
only by the command that runs them."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.argtypes import CommandError, positive_int, seconds, seconds_or_zero
from core.bus import DEFAULT_URL, BusError
from core.runtime import Interrupted, Signals
from core.server import ServerError
from core.subjects import InvalidToken
from projections.schema import ProjectionError

if TYPE_CHECKING:
    from core.stack import Stack

__all__ = ["main"]

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
TRACED_COMMANDS = ("sentinel", "worker", "submit")  # the ones that make spans
SERVICE_NATS_WAIT_S = 30.0  # a service may start before its server; a command fails fast
UP_PORT = 4222
SERVICES = ("sentinel", "worker", "projector")


# -- services -----------------------------------------------------------------------------

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
    from sentinel.service import Sentinel

    policy, per_queue = _retry_policies(a.retry)
    sentinel = Sentinel(a.nats, lease_s=a.lease, policy=policy, queue_policies=per_queue,
                        wait_nats_s=a.wait_nats)
    return await _serve_until_signal(sentinel.start(), sentinel.stop)


async def cmd_worker(a: argparse.Namespace) -> int:
    from workers.worker import Worker

    worker = Worker(a.nats, handlers=a.handlers, queues=tuple(_csv(a.queue)),
                    concurrency=a.concurrency, lease_s=a.lease, heartbeat_s=a.heartbeat,
                    grace_s=a.grace, prefetch=a.prefetch, memory_limit_mb=a.memory_limit,
                    wait_nats_s=a.wait_nats)
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
    from projections.projector import Projector

    projector = Projector(a.nats, _db_path(a), wait_nats_s=a.wait_nats)
    return await _serve_until_signal(projector.start(), projector.stop)


async def cmd_up(a: argparse.Namespace) -> int:
    from core.bus import Unreachable
    from core.stack import Stack

    env_url = os.environ.get("JETFLOW_NATS_URL")
    port, url, source = up_server(a.port, a.nats, env_url)
    stack = Stack(data_dir=Path(a.data), port=port, nats_url=url, workers=a.workers,
                  handlers=a.handlers, concurrency=a.concurrency, durable=a.durable,
                  lease_s=a.lease, restart=True)
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


# -- submitting and reading ------------------------------------------------------------------

async def cmd_submit(a: argparse.Namespace) -> int:
    from core.client import SubmissionRejected, connect

    args = _json_arg(a.args, "--args")
    client = await connect(a.nats)
    try:
        job_id = await client.submit(a.handler, args, queue=a.queue, priority=a.priority,
                                     job_id=a.job_id, max_attempts=a.max_attempts,
                                     timeout_s=a.timeout, queue_timeout_s=a.queue_timeout,
                                     deadline_s=a.deadline)
    except SubmissionRejected as exc:
        if a.json:
            print(json.dumps({"job_id": exc.job_id,
                              "rejected": {"code": exc.code, "reason": exc.reason}}))
        else:
            print(f"rejected: {exc.reason} [{exc.code}] (job {exc.job_id})", file=sys.stderr)
        await client.close()
        return 2
    if not a.wait:
        print(json.dumps({"job_id": job_id}) if a.json else job_id)
        await client.close()
        return 0
    try:
        job = await client.wait(job_id, timeout=a.wait_timeout)
    except TimeoutError:
        state = (await client.status(job_id)).state
        return _error(a, f"timed out: job {job_id} is still {state} after "
                         f"{a.wait_timeout:g}s; it goes on (`jetflow job {job_id}`)",
                      job_id=job_id, state=state)
    finally:
        await client.close()
    _print_final(job, a.json)
    return 0 if job.state == "succeeded" else 1


def _print_final(job: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"job_id": job.job_id, "state": job.state, "attempt": job.attempt,
                          "result": job.result, "error": job.error}))
        return
    print(f"{job.job_id} {job.state} (attempt {job.attempt})")
    if job.result is not None:
        print(f"result: {json.dumps(job.result)}")
    if job.error:
        print(f"error: {job.error.get('error_type', '')}: {job.error.get('message', '')}")


async def cmd_cancel(a: argparse.Namespace) -> int:
    return await _control(a, "cancel")


async def cmd_retry(a: argparse.Namespace) -> int:
    return await _control(a, "retry")


async def _control(a: argparse.Namespace, verb: str) -> int:
    from core.client import connect

    client = await connect(a.nats)
    try:
        if verb == "cancel":
            answer = await client.cancel(a.job_id, a.reason)
        else:
            answer = await client.retry(a.job_id, a.attempts)
    finally:
        await client.close()
    if a.json:
        print(json.dumps(answer))
    elif answer.get("noop"):
        print(answer["message"])
    elif verb == "cancel":
        print(f"{a.job_id}: cancel requested" + (" (stopping its process)"
                                                 if answer.get("running") else ""))
    else:
        print(f"{a.job_id}: queued again for attempt {answer['attempt']} "
              f"(up to {answer['max_attempts']})")
    return 0


# -- plumbing -------------------------------------------------------------------------------

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


def _retry_policies(specs: list[str]) -> tuple[Any, dict[str, Any]]:
    from core.retry import RetryPolicy

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


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _json_arg(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{flag} must be a JSON object")
    return value


def _db_path(a: argparse.Namespace) -> Path:
    return Path(a.db) if a.db else Path(a.data) / "projections.sqlite"


def common_options(p: argparse.ArgumentParser, *, nats_help: str | None = None) -> None:
    p.add_argument("--nats", default=os.environ.get("JETFLOW_NATS_URL"), metavar="URL",
                   help=nats_help or f"NATS server or cluster URL (env JETFLOW_NATS_URL, "
                                     f"default {DEFAULT_URL})")
    p.add_argument("--log-level", default=os.environ.get("JETFLOW_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING... (env JETFLOW_LOG_LEVEL)")
    p.add_argument("--log-format", choices=("text", "json"),
                   default=os.environ.get("JETFLOW_LOG_FORMAT", "text"),
                   help="text, or json for one structured object per line; both carry the "
                        "correlation id and trace id (env JETFLOW_LOG_FORMAT)")
    p.add_argument("--trace-console", action="store_true",
                   help="print spans to stderr (local debugging; also sets "
                        "OTEL_TRACES_EXPORTER for the processes this one starts)")


def _parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="jetflow", description="Event-sourced job processing on NATS JetStream.",
        epilog="Run `jetflow up` to start everything locally, then `jetflow submit echo "
               "--args '{\"x\":1}' --wait`.")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(sub)
    _add_services(sub)
    _add_client(sub)
    _add_operations(sub)
    from core.trace_cli import add_commands as add_trace_commands
    from projections.cli import add_commands  # read models, replay and export

    add_commands(sub, common_options)
    add_trace_commands(sub, common_options)
    return root


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
    p.set_defaults(nats=None)  # only an explicit --nats here: see the description
    p.add_argument("--port", type=int,
                   help=f"start the embedded server on this port ({UP_PORT}); wins over "
                        "JETFLOW_NATS_URL")
    p.add_argument("--data", default=".jetflow", help="data directory (./.jetflow)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--handlers", default="echo,sleep,fail", help="handlers of each worker")
    p.add_argument("--concurrency", type=positive_int, default=4,
                   help="jobs at once per worker (4)")
    p.add_argument("--lease", type=seconds, default=15.0, help="worker lease in seconds (15)")
    p.add_argument("--durable", action="store_true",
                   help="fsync every write (sync_interval: always): survives power loss, "
                        "slower")
    p.set_defaults(run=cmd_up)


def service_options(p: argparse.ArgumentParser) -> None:
    common_options(p)
    p.add_argument("--wait-nats", type=seconds, default=SERVICE_NATS_WAIT_S, metavar="S",
                   help="at startup, wait this long for the NATS server "
                        f"({SERVICE_NATS_WAIT_S:g} s)")


def _add_services(sub: Any) -> None:
    p = sub.add_parser("sentinel", help="run the control plane (one or more)")
    service_options(p)
    p.add_argument("--lease", type=seconds, default=15.0,
                   help="declare a worker lost after this many silent seconds (15)")
    p.add_argument("--retry", action="append", default=[], metavar="[QUEUE=]BASE,FACTOR,CAP",
                   help="backoff: BASE seconds x FACTOR^n, at most CAP (default 1,2,300); "
                        "QUEUE= sets it for one queue; repeatable. A job's own 'retry' "
                        "field wins.")
    p.set_defaults(run=cmd_sentinel)

    p = sub.add_parser("worker", help="run a worker")
    service_options(p)
    p.add_argument("--queue", default="default", help="queue(s) to serve, comma-separated")
    p.add_argument("--handlers", default="echo,sleep,fail",
                   help="handlers: built-in names or name=module:function, comma-separated")
    p.add_argument("--concurrency", type=positive_int, default=4, help="jobs at once (4)")
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

    p = sub.add_parser("projector", help="keep the SQLite projections up to date")
    service_options(p)
    p.add_argument("--db", help="SQLite file (default <data>/projections.sqlite)")
    p.add_argument("--data", default=".jetflow", help="data directory (./.jetflow)")
    p.set_defaults(run=cmd_projector)


def _add_client(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a job",
                       description="Submit a job; prints its id (with --wait, its outcome; "
                                   "exit 1 if it did not succeed, 2 if rejected).")
    common_options(p)
    p.add_argument("handler")
    p.add_argument("--args", default="{}", help="JSON object of arguments")
    p.add_argument("--queue", default="default")
    p.add_argument("--priority", type=int, default=0, help="0-9, higher first")
    p.add_argument("--job-id", help="your own id ([A-Za-z0-9_-]{1,64}); idempotent")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--timeout", type=seconds, help="seconds per attempt (the child is killed)")
    p.add_argument("--queue-timeout", type=seconds,
                   help="give up (timed_out) if not started within this many seconds")
    p.add_argument("--deadline", type=seconds,
                   help="seconds from submission to finish, across all attempts")
    p.add_argument("--wait", action="store_true", help="wait for the outcome")
    p.add_argument("--wait-timeout", type=seconds, default=300.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_submit)


def _add_operations(sub: Any) -> None:
    p = sub.add_parser("cancel", help="cancel a job (queued: at once; running: stops it)")
    common_options(p)
    p.add_argument("job_id")
    p.add_argument("--reason", help="recorded in the cancel_requested event")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_cancel)

    p = sub.add_parser("retry", help="re-drive a dead-lettered job (its history is kept)")
    common_options(p)
    p.add_argument("job_id")
    p.add_argument("--attempts", type=positive_int, default=3, help="more attempts to allow (3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_retry)


async def _with_task_dump(args: argparse.Namespace) -> int:
    from core.runtime import install_task_dump

    install_task_dump()  # kill -USR1 <pid> logs where every task waits
    return int(await args.run(args))


def _setup_logging(a: argparse.Namespace) -> None:
    from core.tracing import install_logging

    install_logging(a.log_level, a.log_format, service=f"jetflow-{a.command}")
    logging.getLogger("nats").setLevel(logging.CRITICAL)


def _setup_tracing(a: argparse.Namespace) -> None:
    """Commands that make spans install the SDK when an exporter is configured."""
    from core import tracing

    if a.trace_console:
        tracing.ask_for_console()
    if a.command in TRACED_COMMANDS:
        tracing.setup(a.command)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in SERVICES:  # started by `jetflow up`: stopped (SIGTERM) if it dies
        from core.runtime import STOP_WITH_PARENT_ENV, die_with_parent

        die_with_parent(STOP_WITH_PARENT_ENV, signal.SIGTERM)
    _setup_logging(args)
    _setup_tracing(args)
    try:
        return _main(args)
    finally:
        from core.tracing import shutdown

        shutdown()  # flush the spans still buffered


def _main(args: argparse.Namespace) -> int:
    # SIGPIPE stays ignored (Python's default): with SIG_DFL a service writing to the
    # socket of a nats-server that just died is killed without a word.
    from core.client import JobError

    try:
        from core.runtime import run

        return run(_with_task_dump(args))
    except BrokenPipeError:  # `jetflow job X | head`: the reader left
        sys.stderr.close()
        return 0
    except (BusError, JobError, ProjectionError, InvalidToken, ServerError,
            CommandError) as exc:
        # no server, no such job, a projection file that cannot be used, a job id that
        # cannot be one, a port taken, --args that are no JSON object
        return _error(args, str(exc))
    except TimeoutError as exc:
        return _error(args, f"timed out: {exc}" if str(exc) else "timed out")
    except Interrupted as exc:  # stopped while it was starting: nothing half done is left
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signal
    except KeyboardInterrupt:
        return 130


def _error(args: argparse.Namespace, message: str, **context: object) -> int:
    """One line on stderr; with ``--json``, ``{"error": ..., **context}`` on stdout
    instead, so a program reading the output gets JSON either way. Exit code 1."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, **context}), flush=True)
    else:
        print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
