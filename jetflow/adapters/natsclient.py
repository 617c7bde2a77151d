"""nats-py's client plus *raw subscriptions*, for reading a stream in bulk.

nats-py turns every delivered message into a ``Msg``: it parses the header block into a
dict, decodes the subjects, queues the message and wakes the subscription's task. That
costs ~15 µs a message on this 2-core machine and capped a replay's reading at ~50k
events/s. A raw subscription skips all of it: the protocol parser's bytes go straight to
a plain (synchronous) callback, ``cb(subject, reply, data, header_block)``, and whoever
reads a stream in bulk parses only the little it needs (:mod:`jetflow.core.metadata`).

Everything else (connecting, reconnecting and re-subscribing, unsubscribing) stays
nats-py's: a raw subscription is an ordinary subscription whose messages are diverted.

Two guards protect every subscription of the connection, raw or not. A subject that is not
UTF-8 (any client can publish one, and a stream then keeps it) reaches subscribers with
its bad bytes replaced by U+FFFD, where nats-py would raise decoding it, drop the
connection and get the same message again after reconnecting, for ever. A raw callback
that raises is reported to the error callback, not allowed to end the reading loop.
The diversion overrides ``Client._process_msg(sid, subject, reply, data, headers)``,
whose signature nats-py has kept through 2.x (pyproject pins ``nats-py<3``); a test reads
a stream through it against the real server.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping

from nats import errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["Client", "RawCallback"]

log = logging.getLogger("jetflow.nats")

# (subject, reply, data, header block or None): all bytes, as they came off the wire
RawCallback = Callable[[bytes, bytes, bytes, bytes | None], None]


# what nats-py refuses in a subject (whitespace: a CRLF would inject protocol) and accepts
# as a header name
_BAD_SUBJECT = re.compile(r"[ \t\r\n]")
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_KNOWN_KEYS_MAX = 4096


class Client(NATS):
    def __init__(self) -> None:
        super().__init__()
        self._raw_callbacks: dict[int, RawCallback] = {}
        self._good_keys: set[str] = set()  # header names checked once

    def publish_now(self, subject: str, payload: bytes = b"", reply: str = "",
                    headers: Mapping[str, str] | None = None) -> None:
        """``publish`` without a coroutine: the message joins the pending buffer at once
        and the flusher is woken, as nats-py's ``publish`` does, at a fraction of its
        cost (it awaits four coroutines and may make a future per message; the sentinel
        publishes a few messages per job). It raises what ``publish`` raises, but never
        waits: a caller that could flood a stalled connection bounds itself (appends have
        the publisher's window, answers and acks follow requests). While reconnecting,
        the message is buffered, as nats-py does, within the reconnect buffer."""
        if self.is_closed:
            raise errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise errors.ConnectionDrainingError
        if not subject or _BAD_SUBJECT.search(subject) or (reply and _BAD_SUBJECT.search(reply)):
            raise errors.BadSubjectError
        size = len(payload)
        if size > self._max_payload:
            raise errors.MaxPayloadError
        connected = self.is_connected
        if not connected and (self._max_pending_size <= 0
                              or size + self._pending_data_size > self._max_pending_size):
            raise errors.OutboundBufferLimitError
        if headers:
            block = self._header_block(headers)
            cmd = b"".join((f"HPUB {subject} {reply} {len(block)} {len(block) + size}\r\n"
                            .encode(), block, payload, b"\r\n"))
        else:
            cmd = b"".join((f"PUB {subject} {reply} {size}\r\n".encode(), payload, b"\r\n"))
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += size
        if connected:
            self._kick_flusher()

    def _header_block(self, headers: Mapping[str, str]) -> bytes:
        lines = ["NATS/1.0\r\n"]
        for k, v in headers.items():
            key = k.strip()
            if not key:
                continue  # (nats-py skips an empty name)
            if key not in self._good_keys:
                if not _HEADER_KEY.fullmatch(key):
                    raise errors.BadHeaderError(key)
                if len(self._good_keys) < _KNOWN_KEYS_MAX:
                    self._good_keys.add(key)
            value = v.strip()
            if "\r" in value or "\n" in value:
                value = value.translate(_NEWLINES)
            lines.append(f"{key}: {value}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode()

    def _kick_flusher(self) -> None:
        queue = self._flush_queue
        task = self._flusher_task
        if queue is None:
            return
        if task is None or task.done():  # (nats-py then writes inline, as here)
            if self._transport is not None and self._pending_data_size > 0:
                self._transport.writelines(self._pending[:])
                self._pending = []
                self._pending_data_size = 0
            return
        if queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())

    async def subscribe_raw(self, subject: str, cb: RawCallback,
                            queue: str = "") -> Subscription:
        """Subscribe with ``cb`` called for each message, in the reading task, unparsed
        (in queue group ``queue``, if given). ``cb`` must not block; unsubscribe with
        :meth:`unsubscribe_raw`."""
        sub = await self.subscribe(subject, queue=queue, cb=_diverted, pending_msgs_limit=-1,
                                   pending_bytes_limit=-1)
        self._raw_callbacks[sub._id] = cb
        return sub

    async def unsubscribe_raw(self, sub: Subscription) -> None:
        self._raw_callbacks.pop(sub._id, None)
        await sub.unsubscribe()

    async def _flusher(self) -> None:
        """nats-py's flusher, which writes what is pending once a publish wakes it, with
        one more turn of the event loop before each write: publishes that the same
        moment's work makes (acks, appends, offers of a batch) go out in one socket write
        instead of one each. A write costs ~25 µs of system time on a loopback socket here,
        more than the Python that makes a message; the turn costs a few µs."""
        assert self._transport is not None and self._flush_queue is not None
        while self.is_connected and not self.is_connecting:
            future = await self._flush_queue.get()
            try:
                await asyncio.sleep(0)
                if self._pending_data_size > 0:
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    await self._transport.drain()  # type: ignore[no-untyped-call]
            except OSError as exc:
                await self._error_cb(exc)
                await self._process_op_err(exc)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break
            finally:
                if not future.done():
                    future.set_result(None)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        if not subject.isascii():  # ~30 ns; almost every subject is plain ASCII
            subject = subject.decode(errors="replace").encode()
        cb = self._raw_callbacks.get(sid)
        if cb is None:
            # nats-py annotates ``headers`` as bytes but passes None for a message without
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        try:
            cb(subject, reply, data, headers)
        except Exception as exc:  # noqa: BLE001 - the connection must go on reading
            log.warning("a raw subscription's callback failed on %r", subject, exc_info=True)
            await self._error_cb(exc)


async def _diverted(msg: Msg) -> None:
    """A raw subscription's messages do not reach nats-py's queue; only one arriving
    before :meth:`Client.subscribe_raw` returns could, and is dropped here (the readers
    ask for nothing before then)."""

