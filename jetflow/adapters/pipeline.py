"""Many requests in flight at once, answered in any order: what
:meth:`jetflow.Client.submit_many` sends submissions with.

Every request carries its own reply subject (``<inbox>.<position>``) on one raw
subscription, so an answer costs no task, no future and no parsed message. Up to
``window`` requests are unanswered at a time. One not answered within ``per_try_s`` is
sent again, unchanged (its ``Nats-Msg-Id`` makes the repeat the same submission: the
stream drops it and the sentinel answers from the log); the server's "no responders"
answer means nothing listens, which is waited out for a few seconds (a sentinel
restarting) before :class:`NoResponders` is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from jetflow.adapters.natsclient import Client
from jetflow.core.metadata import status_of

__all__ = ["Pipeline", "NoResponders"]

Request = tuple[str, bytes, dict[str, str]]  # subject, body, headers


class NoResponders(Exception):
    """Nothing listened on a request's subject for ``grace_s``."""


class Pipeline:
    def __init__(self, nc: Client, window: int = 2048, *, per_try_s: float = 2.0,
                 grace_s: float = 3.0) -> None:
        self.nc = nc
        self.window = max(1, window)
        self.per_try_s = per_try_s
        self.grace_s = grace_s
        self._answers: list[bytes | None] = []
        self._open = 0  # sent, not answered
        self._room = asyncio.Event()
        self._all = asyncio.Event()
        self._nobody_since: float | None = None

    async def run(self, requests: Sequence[Request], timeout_s: float) -> list[bytes | None]:
        """The answer to each request, in order (None: none within ``timeout_s``)."""
        self._answers = [None] * len(requests)
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        prefix = self.nc.new_inbox()
        sub = await self.nc.subscribe_raw(f"{prefix}.*", self._on_answer)
        try:
            sent_at = [0.0] * len(requests)
            for i, request in enumerate(requests):
                while self._open >= self.window and loop.time() < deadline:
                    self._room.clear()
                    await self._wait(self._room, deadline)
                    self._check_nobody(loop.time())
                await self._send(prefix, i, request)
                sent_at[i] = loop.time()
            await self._until_answered(prefix, requests, sent_at, deadline)
        finally:
            await self.nc.unsubscribe_raw(sub)
        return self._answers

    async def _send(self, prefix: str, i: int, request: Request) -> None:
        subject, body, headers = request
        self._open += 1
        await self.nc.publish(subject, body, reply=f"{prefix}.{i}", headers=headers)

    async def _until_answered(self, prefix: str, requests: Sequence[Request],
                              sent_at: list[float], deadline: float) -> None:
        """Wait for the answers; send again what stays unanswered for ``per_try_s``."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            if all(a is not None for a in self._answers):
                return
            self._all.clear()
            await self._wait(self._all, min(deadline, loop.time() + 0.25))
            now = loop.time()
            self._check_nobody(now)
            for i, answer in enumerate(self._answers):
                if answer is None and now - sent_at[i] >= self.per_try_s:
                    self._open -= 1  # counted again when sent
                    await self._send(prefix, i, requests[i])
                    sent_at[i] = now

    def _check_nobody(self, now: float) -> None:
        if self._nobody_since is not None and now - self._nobody_since >= self.grace_s:
            raise NoResponders(f"nothing answered for {self.grace_s:g}s")

    @staticmethod
    async def _wait(event: asyncio.Event, until: float) -> None:
        left = until - asyncio.get_running_loop().time()
        if left > 0:
            try:
                async with asyncio.timeout(left):
                    await event.wait()
            except TimeoutError:
                pass

    def _on_answer(self, subject: bytes, reply: bytes, data: bytes,
                   headers: bytes | None) -> None:
        try:
            i = int(subject.rsplit(b".", 1)[-1])
        except ValueError:
            return
        if not 0 <= i < len(self._answers) or self._answers[i] is not None:
            return
        status = status_of(headers)
        if status is not None and status[0] == "503":  # no responders: nobody listens
            if self._nobody_since is None:
                self._nobody_since = asyncio.get_running_loop().time()
            return
        self._nobody_since = None
        self._answers[i] = data
        self._open -= 1
        self._room.set()
        self._all.set()
