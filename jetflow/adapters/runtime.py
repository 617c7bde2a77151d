"""Process plumbing shared by the services: supervised loops and signal-driven shutdown."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

__all__ = ["tune_gc", "supervise", "cancel_and_wait", "Signals", "Interrupted", "wait_for_signal",
           "die_with_parent", "install_task_dump", "run", "loop_name"]

T = TypeVar("T")

log = logging.getLogger("jetflow")


def tune_gc() -> None:
    """For a long-running service: what is allocated by the time it runs (modules, the
    state it rebuilt) is frozen out of the cyclic collector's scans, and the youngest
    generation is collected every 20,000 allocations instead of 700. A service makes
    few reference cycles; at a few thousand messages a second the default thresholds
    spent ~20% of a sentinel's time collecting (measured on this 2-core machine)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``; a no-op
    elsewhere): after a burst, a service's RSS falls back instead of keeping its peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def supervise(name: str, loop: Callable[[], Awaitable[None]],
                    restart_delay_s: float = 1.0,
                    finished: Callable[[], bool] = lambda: False) -> None:
    """Run ``loop`` forever: a crash is logged and the loop restarted, never lost silently.
    A loop that returns once ``finished()`` holds (its service is stopping) has ended."""
    from jetflow.adapters.bus import Resubscribe

    while True:
        try:
            await loop()
            if finished():
                return
            log.warning("%s loop returned; restarting", name)
        except asyncio.CancelledError:
            raise
        except Resubscribe:
            log.info("%s: reconnected, subscribing anew", name)
            continue
        except Exception:
            log.exception("%s loop crashed; restarting in %.1fs", name, restart_delay_s)
        await asyncio.sleep(restart_delay_s)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], again_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until every one has ended. A task still running ``again_s``
    later is cancelled again: nats-py swallows a cancellation that lands in its flush
    (``except CancelledError: pass``), and one cancel then leaves a shutdown waiting forever
    on a loop that goes on."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=again_s)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %r", task.get_name(), task.exception())


class Interrupted(Exception):
    """A stop signal arrived before the service was ready."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(f"{sig.name} before the service was ready")
        self.signal = sig


class Signals:
    """SIGINT, SIGTERM and SIGHUP (or ``signals``) caught from the moment this is entered, so one
    that arrives while a service is still starting is kept instead of killing the process
    (a worker killed so never records that it left). Every arrival is counted: a service
    may treat the second as "hurry" while it stops."""

    def __init__(self, *signals: signal.Signals) -> None:
        # SIGHUP too (the terminal closed), unless ignored on purpose (`nohup`)
        hup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
        self.chosen = signals or (signal.SIGINT, signal.SIGTERM, *hup)
        self.received: list[signal.Signals] = []
        self._arrived: asyncio.Event | None = None

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        self._arrived = arrived_event = asyncio.Event()

        def arrived(sig: signal.Signals) -> None:
            self.received.append(sig)
            arrived_event.set()

        for sig in self.chosen:
            loop.add_signal_handler(sig, arrived, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.chosen:
            loop.remove_signal_handler(sig)

    async def wait(self, count: int = 1) -> signal.Signals:
        """The ``count``-th signal, once it has arrived (at once if it already has)."""
        assert self._arrived is not None, "enter Signals first"
        while len(self.received) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return self.received[count - 1]

    async def before(self, work: Coroutine[Any, Any, T]) -> T:
        """``work``'s result, unless a signal arrives first: then ``work`` is cancelled
        (its own cleanup runs) and :class:`Interrupted` is raised."""
        task = asyncio.create_task(work)
        signalled = asyncio.create_task(self.wait())
        await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            signalled.cancel()
            return task.result()
        # Cancelled once, and waited for however long its cleanup takes (stopping what a
        # half-done start launched can take a while): a second cancel would cut that short.
        # A cancel swallowed on the way (nats-py) only means the start finishes; then the
        # caller stops it the usual way.
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None:
            return task.result()  # it finished as the signal came: stop it the usual way
        raise Interrupted(signalled.result())


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# In a service's environment: the pid of the `jetflow up` (jetflow.up) it runs under
STOP_WITH_PARENT_ENV = "JETFLOW_STOP_WITH_PARENT"


def die_with_parent(env_name: str, sig: signal.Signals) -> None:
    """When the environment variable ``env_name`` holds this process's parent pid, have the
    kernel send ``sig`` to this process as soon as that parent dies, however it dies
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing happens). The variable is removed, so the
    processes this one starts do not take it for theirs."""
    value = os.environ.pop(env_name, "")
    if not value.isdigit():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != int(value):  # the parent died before prctl: as if just now
        os.kill(os.getpid(), sig)


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
    with Signals(*signals) as caught:
        return await caught.wait()


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
