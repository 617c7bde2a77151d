"""A fast, resilient batch reader of a stream: what the projector, the replay and the
export read with.

It has :class:`jetflow.adapters.bus.Tail`'s contract (batches from a sequence onwards, an
empty batch after an idle period, a new ephemeral consumer right after the last sequence seen when
anything fails) but not its speed limit: nats-py's ``fetch()`` waits for every message
with a fresh task and ``wait_for`` (~21k messages/s on this machine), and even a plain
callback subscription parses every header block into a dict and queues a ``Msg`` for a
task (~50k/s). Here a raw subscription (:mod:`jetflow.adapters.natsclient`) hands the wire's
bytes to a synchronous callback that keeps them; a batch is turned into
:class:`jetflow.core.metadata.Stored` tuples in one pass, with only the ack subject parsed and the
header block kept unparsed for whoever needs a header (``bench/replay.py`` measures it).

Protocol: one pull request open at a time (a delivered message carries its original
subject, not the request's, so only the status that ends a request names it). A
``no_wait`` request asks for up to ``batch`` stored messages and ends at once (with a
status when fewer were there); when nothing was there, a long poll for one message
(``expires`` = ``idle_s``) waits for the next append. While the caller works on a full
batch, the request for the next one is already being answered. An ``eager`` reader (the
sentinel's tail and intake) keeps one pull for ``batch`` open instead and takes its
messages as they come (see :meth:`StreamReader._standing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig

from jetflow.adapters.bus import tail_consumer
from jetflow.adapters.natsclient import Client
from jetflow.core.metadata import Stored, ack_numbers, status_of

__all__ = ["StreamReader", "StreamUnreadable", "QueueReader", "Delivery"]

log = logging.getLogger("jetflow.reader")

_API_NEXT = "$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
_HEARTBEAT = "100"
# (reply, subject, data, header block) of a delivered message, as the wire had them
_Wire = tuple[bytes, bytes, bytes, bytes | None]
_ENDED = ("404", "408")  # no (more) messages; the request expired
_SLACK_S = 5.0  # how much longer than asked a request may take before we call it lost
_RETRY_S = 0.5  # the pause before a fresh consumer, after a failure


class StreamUnreadable(RuntimeError):
    """Reading failed again and again for longer than the reader's ``give_up_s``."""


@dataclass(eq=False)
class _Pull:
    """One pull request: the messages it brought and whether the server ended it."""

    size: int
    msgs: list[_Wire] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = ""
    count: int = 0  # messages it brought (a standing pull's are taken as they come)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a message, or the end


class StreamReader:
    """``async for msgs in StreamReader(nc, "JF_EVENTS", start_seq=1).batches(): ...``
    where ``nc`` comes from :func:`jetflow.adapters.bus.connect` and each batch is a list of
    :class:`jetflow.core.metadata.Stored`.

    A failure (a lost server, a deleted consumer, a bad delivery) is retried with a fresh
    consumer after a pause, for ever by default (the live projector waits out any outage);
    with ``give_up_s`` (a replay, which someone is waiting for), :class:`StreamUnreadable`
    is raised once reading has failed for that long without a batch in between."""

    def __init__(self, nc: Client, stream: str, *, start_seq: int = 1, batch: int = 2000,
                 idle_s: float = 1.0, linger_s: float = 0.0,
                 give_up_s: float | None = None, eager: bool = False) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.stream = stream
        self.next_seq = max(1, start_seq)
        self.batch = batch
        self.idle_s = idle_s
        self.linger_s = linger_s
        self.caught_up = False
        self._last_delivery = 0  # the consumer's sequence of the last message yielded
        self._consumer = ""
        self._inbox = ""
        self._sub: Subscription | None = None
        self._pull: tuple[str, _Pull] | None = None
        self._tokens = itertools.count(1)
        self._ahead: tuple[str, _Pull] | None = None
        self.give_up_s = give_up_s
        self.eager = eager  # yield what a long poll brought at once (the sentinel's tail)
        self._failing_since: float | None = None

    async def batches(self) -> AsyncIterator[list[Stored]]:
        """Yield non-empty batches in stream order; [] after an idle period."""
        while True:
            wire = await self._next()
            if not wire:
                yield []
                continue
            try:
                msgs, first, last, pending = _stored(wire)
            except ValueError as exc:  # not a JetStream delivery: start afresh
                await self._failed(str(exc))
                continue
            if not self._contiguous(first, last, len(msgs)):
                await self._failed("a delivery went missing")
                continue
            self._failing_since = None
            self.next_seq = msgs[-1].seq + 1
            self.caught_up = pending == 0
            yield msgs

    def _contiguous(self, first: int, last: int, count: int) -> bool:
        """Whether the consumer delivered these right after the last batch, none lost."""
        ok = first == self._last_delivery + 1 and last - first + 1 == count
        self._last_delivery = last
        return ok

    async def _next(self) -> list[_Wire]:
        try:
            if self._sub is None:
                await self._subscribe()
            wire = await self._fetch()
        except Exception as exc:  # noqa: BLE001 - any failure: a fresh consumer
            await self._failed(f"{type(exc).__name__}: {exc}")
            return []
        if not wire:  # an answered request, nothing new: reading works
            self._failing_since = None
        return wire

    async def _failed(self, reason: str) -> None:
        """Drop the consumer and pause; give up if failing for over ``give_up_s``."""
        now = asyncio.get_running_loop().time()
        if self._failing_since is None:
            self._failing_since = now
        failing_s = now - self._failing_since
        await self.close()
        if self.give_up_s is not None and failing_s >= self.give_up_s:
            raise StreamUnreadable(f"cannot read {self.stream} from seq {self.next_seq}: "
                                   f"failing for {failing_s:.0f}s, last: {reason}")
        log.warning("reading %s failed (%s); resubscribing at %d", self.stream, reason,
                    self.next_seq)
        await asyncio.sleep(_RETRY_S)

    async def _fetch(self) -> list[_Wire]:
        if self.eager:
            return await self._standing()
        token, pull = self._ahead or await self._request(self.batch, no_wait=True)
        self._ahead = None
        await self._finish(token, pull, _SLACK_S)
        if pull.msgs:
            if len(pull.msgs) == pull.size:  # probably more stored: ask for it right away
                self._ahead = await self._request(self.batch, no_wait=True)
            return pull.msgs
        self.caught_up = True
        return await self._long_poll()

    async def _long_poll(self) -> list[_Wire]:
        """Wait up to ``idle_s`` for the next message, then take what else came with it."""
        token, pull = await self._request(1, no_wait=False)
        await self._finish(token, pull, self.idle_s + _SLACK_S)
        if not pull.msgs:
            return []
        if self.batch == 1 or self.eager:
            return pull.msgs
        if self.linger_s:
            await asyncio.sleep(self.linger_s)
        token, more = await self._request(self.batch - 1, no_wait=True)
        await self._finish(token, more, _SLACK_S)
        return pull.msgs + more.msgs

    async def _standing(self) -> list[_Wire]:
        """An eager reader's (the sentinel's) messages as they come: one pull for
        ``batch`` stays open until it is filled or expires (``idle_s``: then ``[]``), and
        what it brought since the last call is taken. An idle log costs a request a
        second, an append one delivery; a request per batch and the status ending each
        cost two round trips an event, on the server and here, when events come one by
        one. A filled pull's successor is asked for before its messages are handed on."""
        if self._pull is None:
            await self._request(self.batch, no_wait=False)
        assert self._pull is not None
        pull = self._pull[1]
        await self._arrival(pull)
        msgs, pull.msgs = pull.msgs, []
        pull.arrived.clear()
        if pull.done.is_set():
            self._pull = None
            if not msgs and pull.status and not pull.status.startswith(_ENDED):
                raise RuntimeError(f"pull refused: {pull.status}")  # (see _finish)
            if pull.count >= pull.size:
                await self._request(self.batch, no_wait=False)
        return msgs

    async def _arrival(self, pull: _Pull) -> None:
        """Wait until ``pull`` has brought a message or ended; a pull that vanished
        (its consumer gone: never answered) counts as lost, as in :meth:`_finish`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idle_s + _SLACK_S
        wait_s = self.idle_s + 1.0
        while not (pull.msgs or pull.done.is_set()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await pull.arrived.wait()
            wait_s = 1.0
            if pull.msgs or pull.done.is_set():
                return
            if loop.time() > deadline or not await self._consumer_exists():
                raise TimeoutError(f"pull request on {self.stream} unanswered")

    async def _request(self, size: int, *, no_wait: bool) -> tuple[str, _Pull]:
        token = str(next(self._tokens))
        pull = _Pull(size)
        self._pull = (token, pull)
        body: dict[str, object] = {"batch": size}
        if no_wait:
            body["no_wait"] = True
        else:
            body["expires"] = int(self.idle_s * 1e9)
        subject = _API_NEXT.format(stream=self.stream, consumer=self._consumer)
        await self.nc.publish(subject, json.dumps(body).encode(),
                              reply=f"{self._inbox}.{token}")
        return token, pull

    async def _finish(self, token: str, pull: _Pull, timeout_s: float) -> None:
        """Wait until the server ends ``pull``. A pull whose consumer vanished (deleted,
        expired, a server restart) is never answered: every second without an answer
        the consumer is looked up, and a pull silent for ``timeout_s`` counts as lost."""
        loop = asyncio.get_running_loop()
        deadline, seen = loop.time() + timeout_s, 0
        wait_s = timeout_s - _SLACK_S + 1.0  # a long poll is not looked into before expiry
        try:
            while not pull.done.is_set():
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation
                # that arrives as the event is set, and the reader would never stop
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await pull.done.wait()
                wait_s = 1.0
                if pull.done.is_set():
                    break
                if len(pull.msgs) > seen:  # still arriving: a big batch, a busy server
                    deadline, seen = loop.time() + timeout_s, len(pull.msgs)
                if loop.time() > deadline or not await self._consumer_exists():
                    raise TimeoutError(f"pull request on {self.stream} unanswered")
        finally:
            self._pull = None
        if not pull.msgs and pull.status and not pull.status.startswith(_ENDED):
            # 409 (consumer deleted, server shutdown...), 503 (no such consumer): a pull
            # that would fail the same way at once if repeated, so start afresh instead.
            raise RuntimeError(f"pull refused: {pull.status}")

    def _on_msg(self, subject: bytes, reply: bytes, data: bytes,
                headers: bytes | None) -> None:
        if self._pull is None:
            return
        token, pull = self._pull
        # a status ("NATS/1.0 404 No Messages") has a space where headers have "\r\n"
        status = None if headers is None or headers[8:9] != b" " else status_of(headers)
        if status is None:
            pull.msgs.append((reply, subject, data, headers))
            pull.count += 1
            if pull.count >= pull.size:
                pull.done.set()
            pull.arrived.set()
        elif status[0] != _HEARTBEAT and subject.decode() == f"{self._inbox}.{token}":
            pull.status = " ".join(status).strip()
            pull.done.set()
            pull.arrived.set()

    async def _subscribe(self) -> None:
        info = await self.js.add_consumer(self.stream, config=tail_consumer(self.next_seq,
                                                                            None))
        self._consumer = str(info.name)
        self._last_delivery = 0
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe_raw(f"{self._inbox}.*", self._on_msg)

    async def _consumer_exists(self) -> bool:
        try:
            await self.js.consumer_info(self.stream, self._consumer, timeout=2.0)
        except nats.js.errors.NotFoundError:
            log.warning("consumer on %s is gone; resubscribing at %d", self.stream,
                        self.next_seq)
            return False
        except Exception:  # noqa: BLE001 - disconnected: keep waiting for the deadline
            pass
        return True

    async def close(self) -> None:
        """Drop the subscription and the consumer (a new one starts at ``next_seq``)."""
        sub, self._sub = self._sub, None
        self._pull = None
        self._ahead = None
        if sub is not None:
            with contextlib.suppress(Exception):
                await self.nc.unsubscribe_raw(sub)
        if self._consumer:
            consumer, self._consumer = self._consumer, ""
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.js.delete_consumer(self.stream, consumer), 2.0)


_as_stored: Callable[[tuple[Any, ...]], Stored] = functools.partial(tuple.__new__, Stored)


def _stored(wire: list[_Wire]) -> tuple[list[Stored], int, int, int]:
    """The batch as :class:`Stored`, with the consumer sequences of its first and last
    message and the pending count after it; ValueError if a reply is no ack subject."""
    msgs: list[Stored] = []
    append = msgs.append
    first = last = pending = 0
    for reply, subject, data, headers in wire:
        seq, last, time_ns, pending = ack_numbers(reply)
        append(_as_stored((seq, subject.decode(), data, headers, time_ns)))
        if not first:
            first = last
    return msgs, first, last, pending


Delivery = tuple[bytes, bytes, bytes, bytes | None]  # (ack subject, subject, data, headers)


class QueueReader(StreamReader):
    """Batches from a durable, acknowledged pull consumer that several readers may share
    (the sentinels' consumer of JF_SUBMIT), with :class:`StreamReader`'s raw pull
    protocol: ``async for msgs in QueueReader(nc, stream, config).batches()``, each
    message a :data:`Delivery`, acknowledged with :meth:`ack` or :meth:`nak`. Sharing
    means the consumer's sequences are not contiguous here, and closing keeps the
    consumer (its unacknowledged messages are redelivered)."""

    def __init__(self, nc: Client, stream: str, config: ConsumerConfig, *,
                 batch: int = 256, idle_s: float = 1.0) -> None:
        super().__init__(nc, stream, batch=batch, idle_s=idle_s, eager=True)
        self.config = config

    async def deliveries(self) -> AsyncIterator[list[Delivery]]:
        """Yield non-empty batches of deliveries; [] after an idle period."""
        while True:
            wire = await self._next()
            self.caught_up = not wire
            yield wire

    async def ack(self, msgs: list[Delivery]) -> None:
        for reply, *_ in msgs:
            self.nc.publish_now(reply.decode(), b"+ACK")

    async def nak(self, msg: Delivery, delay_s: float) -> None:
        await self.nc.publish(msg[0].decode(),
                              b"-NAK " + json.dumps({"delay": int(delay_s * 1e9)}).encode())

    async def _subscribe(self) -> None:
        try:
            await self.js.consumer_info(self.stream, str(self.config.durable_name))
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(self.stream, config=self.config)
        self._consumer = str(self.config.durable_name)
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe_raw(f"{self._inbox}.*", self._on_msg)

    async def close(self) -> None:
        """Drop the subscription; the durable consumer stays."""
        sub, self._sub = self._sub, None
        self._pull = None
        self._ahead = None
        self._consumer = ""
        if sub is not None:
            with contextlib.suppress(Exception):
                await self.nc.unsubscribe_raw(sub)
