"""Process plumbing shared by the services: supervised loops and signal-driven shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["supervise", "wait_for_signal", "install_task_dump", "run", "loop_name"]

T = TypeVar("T")

log = logging.getLogger("jetflow")


async def supervise(name: str, loop: Callable[[], Awaitable[None]],
                    restart_delay_s: float = 1.0) -> None:
    """Run ``loop`` forever: a crash is logged and the loop restarted, never lost silently."""
    from core.bus import Resubscribe

    while True:
        try:
            await loop()
            log.warning("%s loop returned; restarting", name)
        except asyncio.CancelledError:
            raise
        except Resubscribe:
            log.info("%s: reconnected, subscribing anew", name)
            continue
        except Exception:
            log.exception("%s loop crashed; restarting in %.1fs", name, restart_delay_s)
        await asyncio.sleep(restart_delay_s)


def install_task_dump() -> None:
    """On SIGUSR1, log where every asyncio task of this process is waiting (for stalls)."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        for task in asyncio.all_tasks(loop):
            log.warning("task %s waits in:\n%s", task.get_name(), "\n".join(_await_chain(task)))

    loop.add_signal_handler(signal.SIGUSR1, dump)


def _await_chain(task: asyncio.Task[object]) -> list[str]:
    """The frames of a suspended task, outermost first, following what each one awaits."""
    lines: list[str] = []
    coro: object = task.get_coro()
    while coro is not None and len(lines) < 40:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


async def wait_for_signal(*signals: signal.Signals) -> signal.Signals:
    """Wait until one of ``signals`` (default SIGINT, SIGTERM) arrives; return it."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()
    chosen = signals or (signal.SIGINT, signal.SIGTERM)

    def arrived(sig: signal.Signals) -> None:
        if not got.done():
            got.set_result(sig)

    for sig in chosen:
        loop.add_signal_handler(sig, arrived, sig)
    try:
        return await got
    finally:
        for sig in chosen:
            loop.remove_signal_handler(sig)


def loop_name() -> str:
    """The event loop :func:`run` uses: uvloop when installed (its socket I/O is markedly
    cheaper), else asyncio's; JETFLOW_UVLOOP=0 forces asyncio's."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "asyncio" if os.environ.get("JETFLOW_UVLOOP") == "0" else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the loop :func:`loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
