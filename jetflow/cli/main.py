"""The ``jetflow`` command line: the parser, assembled from one module per command group,
and what every command shares (logging, tracing, one line instead of a traceback)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import nats.errors

from jetflow.adapters.bus import BusError
from jetflow.adapters.nats_server import ServerError
from jetflow.adapters.runtime import Interrupted
from jetflow.cli import (
    cluster,
    control,
    history,
    logs,
    plugin,
    replay,
    services,
    submit,
    trace,
    views,
    workflow,
)
from jetflow.cli.local import find_credentials
from jetflow.cli.options import CommandError, common_options, export_credentials
from jetflow.cli.output import error
from jetflow.core.subjects import InvalidToken
from jetflow.projections.schema import ProjectionError

__all__ = ["main", "parser"]

TRACED_COMMANDS = ("sentinel", "worker", "submit")  # the ones that make spans
GROUPS = (services, submit, workflow, plugin, control, views, history, logs, replay,
          trace, cluster)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="jetflow", description="Event-sourced job processing on NATS JetStream.",
        allow_abbrev=False,  # `up --tls` is no abbreviation of --tls-ca
        epilog="Run `jetflow up` to start everything locally, then `jetflow submit echo "
               "--args '{\"x\":1}' --wait`.")
    common_options(root, top=True)
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return root


async def _with_task_dump(args: argparse.Namespace) -> int:
    from jetflow.adapters.runtime import install_task_dump, tune_gc

    install_task_dump()  # kill -USR1 <pid> logs where every task waits
    if args.command in services.SERVICES:
        tune_gc()
    return int(await args.run(args))


def _setup_logging(a: argparse.Namespace) -> None:
    from jetflow.adapters.tracing import install_logging

    install_logging(a.log_level, a.log_format, service=f"jetflow-{a.command}")
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # nats-py's protocol says so to asyncio on every TLS connection that closes
    logging.getLogger("asyncio").addFilter(
        lambda record: "eof_received() has no effect" not in record.getMessage())


def _setup_tracing(a: argparse.Namespace) -> None:
    """Commands that make spans install the SDK when an exporter is configured."""
    from jetflow.adapters import tracing

    if a.trace_console:
        tracing.ask_for_console()
    if a.command in TRACED_COMMANDS:
        tracing.setup(a.command)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    export_credentials(args)
    try:
        find_credentials(args)  # those of a secured `jetflow up` on this machine
    except Exception as exc:  # noqa: BLE001 - one line, as every failure
        return error(args, f"cannot use the local stack's credentials: {exc}")
    if args.command in services.SERVICES:  # started by `jetflow up`: stopped if it dies
        from jetflow.adapters.runtime import STOP_WITH_PARENT_ENV, die_with_parent

        die_with_parent(STOP_WITH_PARENT_ENV, signal.SIGTERM)
    _setup_logging(args)
    _setup_tracing(args)
    try:
        return _main(args)
    finally:
        from jetflow.adapters.tracing import shutdown

        shutdown()  # flush the spans still buffered


def _main(args: argparse.Namespace) -> int:
    # SIGPIPE stays ignored (Python's default): with SIG_DFL a service writing to the
    # socket of a nats-server that just died is killed without a word.
    from jetflow.adapters.auth import CredentialsError
    from jetflow.adapters.client import JobError
    from jetflow.core.plugin import PluginError
    from jetflow.core.template import TemplateError
    from jetflow.up import StartError
    from jetflow.workers.handlers import HandlerError

    try:
        from jetflow.adapters.runtime import run

        return run(_with_task_dump(args))
    except BrokenPipeError:  # `jetflow job X | head`: the reader left
        sys.stderr.close()
        return 0
    except (BusError, JobError, ProjectionError, InvalidToken, ServerError,
            CommandError, HandlerError, StartError, TemplateError, PluginError,
            CredentialsError) as exc:
        # no server, no such job, a projection file that cannot be used, a job id that
        # cannot be one, a port taken, --args that are no JSON object, a handler that
        # cannot be found, a service of `up` that cannot start
        return error(args, str(exc))
    except TimeoutError as exc:
        return error(args, _timed_out(exc))
    except nats.errors.Error as exc:  # what no command foresaw: still one line
        return error(args, f"NATS said {type(exc).__name__}: {exc}")
    except Interrupted as exc:  # stopped while it was starting: nothing half done is left
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signal
    except KeyboardInterrupt:
        return 130


def _timed_out(exc: TimeoutError) -> str:
    """Why a command timed out: a refused publish when the server reported one."""
    from jetflow.adapters.auth import Credentials
    from jetflow.adapters.bus import last_violation

    refused = last_violation()
    if refused:
        return (f"refused by the server: {refused} (with "
                f"{Credentials.from_env().describe()}): this needs another role's "
                "credentials, e.g. --context <data>/contexts/admin.json on the machine of "
                "`jetflow up`")
    return f"timed out: {exc}" if str(exc) else "timed out"


if __name__ == "__main__":
    sys.exit(main())
