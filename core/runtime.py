"""Process plumbing shared by the services: supervised loops and signal-driven shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

__all__ = ["supervise", "wait_for_signal"]

log = logging.getLogger("jetflow")


async def supervise(name: str, loop: Callable[[], Awaitable[None]],
                    restart_delay_s: float = 1.0) -> None:
    """Run ``loop`` forever: a crash is logged and the loop restarted, never lost silently."""
    while True:
        try:
            await loop()
            log.warning("%s loop returned; restarting", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s loop crashed; restarting in %.1fs", name, restart_delay_s)
        await asyncio.sleep(restart_delay_s)


async def wait_for_signal(*signals: signal.Signals) -> signal.Signals:
    """Wait until one of ``signals`` (default SIGINT, SIGTERM) arrives; return it."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()
    chosen = signals or (signal.SIGINT, signal.SIGTERM)
    for sig in chosen:
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s))
    try:
        return await got
    finally:
        for sig in chosen:
            loop.remove_signal_handler(sig)
