"""Thin NATS adapters: connect, create the streams, append events, tail a stream.

The only module (with ``server``/``client``/``cli``) of ``core`` that does I/O; the pure
modules never import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from jetflow.adapters.auth import Credentials
from jetflow.adapters.natsclient import Client
from jetflow.core import subjects as S
from jetflow.core.codec import encode_event
from jetflow.core.events import Event
from jetflow.core.metadata import parse_ack_reply, status_of
from jetflow.core.origin import Signer, needs_signature

__all__ = [
    "DEFAULT_URL",
    "read_ack",
    "BusError",
    "Conflict",
    "Resubscribe",
    "check_connection",
    "reconnects",
    "connect",
    "ensure_streams",
    "require_stream",
    "job_event_of_type",
    "event_at",
    "last_event_on",
    "no_jetstream",
    "no_stream",
    "NO_JETSTREAM",
    "EventLog",
    "Pending",
    "Ack",
    "Publisher",
    "PublishError",
    "Unreachable",
    "Refused",
    "last_violation",
    "Tail",
    "TIMEOUTS",
    "job_messages_after",
    "FIRST_CONNECT_WAIT_S",
    "default_url",
    "last_job_event",
    "submit_consumer",
    "tail_consumer",
]

log = logging.getLogger("jetflow.bus")

DEFAULT_URL = "nats://127.0.0.1:4222"
WRONG_LAST_SEQUENCE = 10071
# fetch() may raise either one: catching only nats.errors.TimeoutError lets a loop die.
TIMEOUTS = (nats.errors.TimeoutError, asyncio.TimeoutError, TimeoutError)


class BusError(RuntimeError):
    """A NATS/JetStream problem the user has to fix (no JetStream, a clashing stream...)."""


class Resubscribe(Exception):
    """The connection was re-established: a pull subscription must be made anew (nats.py
    issue 504: after a server restart an old one may never receive messages again)."""


def reconnects(nc: NATS) -> int:
    """How many times this connection was re-established (compare to detect one)."""
    return int(nc.stats["reconnects"])


def check_connection(nc: NATS, since: int) -> None:
    if reconnects(nc) != since:
        raise Resubscribe()


class Conflict(Exception):
    """An append whose expected subject sequence did not match: somebody else moved first."""


def default_url() -> str:
    return os.environ.get("JETFLOW_NATS_URL", DEFAULT_URL)


CONNECT_TIMEOUT_S = 2  # one TCP + handshake attempt (nats-py wants an int)
FIRST_CONNECT_WAIT_S = 1.0  # a command fails about this fast when nothing listens


async def connect(url: str | None = None, *, name: str = "jetflow",
                  wait_s: float = FIRST_CONNECT_WAIT_S,
                  credentials: Credentials | None = None) -> Client:
    """Connect, trying again for up to ``wait_s`` (a command fails fast; a service that may
    start before its server passes longer), reconnecting forever afterwards. The client is
    nats-py's with raw subscriptions (:mod:`jetflow.adapters.natsclient`). Without
    ``credentials``, those of the environment (see :mod:`jetflow.adapters.auth`)."""
    creds = credentials if credentials is not None else Credentials.from_env()
    url = url or os.environ.get("JETFLOW_NATS_URL") or creds.url or DEFAULT_URL
    check_url(url)
    options = creds.connect_options()
    deadline = time.monotonic() + wait_s
    errors = _ErrorLog()
    said = False
    while True:
        nc = await _try_connect(url, name, errors, max(deadline - time.monotonic(),
                                                       CONNECT_TIMEOUT_S), options)
        if nc is not None:
            return nc
        if errors.refusal is not None:  # a server answered and said no: no use waiting
            raise Refused(f"NATS at {url} refused the connection: {errors.refusal} (with "
                          f"{creds.describe()})") from None
        if time.monotonic() >= deadline:
            reason = _unreachable_reason(errors.last)
            if isinstance(errors.last, ConnectionResetError) and options:
                reason += f" (it may have refused {creds.describe()})"
            raise Unreachable(url, reason)
        if not said and wait_s > FIRST_CONNECT_WAIT_S:  # a service: say why it is idle
            log.warning("NATS at %s: %s; waiting up to %gs for it", url,
                        _unreachable_reason(errors.last), wait_s)
            said = True
        await asyncio.sleep(0.2)


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def check_url(url: str) -> None:
    """A :class:`BusError` for a server URL whose scheme NATS does not speak (``http://``
    is the usual slip), before anything tries to connect to it."""
    for server in url.split(","):
        scheme, sep, _ = server.strip().partition("://")
        if sep and scheme.lower() not in NATS_SCHEMES:
            raise BusError(f"{server.strip()!r} is not a NATS URL: the scheme is {scheme}://, "
                           "NATS speaks nats:// (or tls://, ws://, wss://); write "
                           "nats://HOST:PORT")


async def _try_connect(url: str, name: str, errors: _ErrorLog, timeout_s: float,
                       options: dict[str, Any]) -> Client | None:
    """One round of attempts (two per server), or None; the reason is in ``errors.last``."""
    nc = Client()
    errors.last = None  # this round's reason, not an earlier one's
    try:
        # nats-py retries a first connect forever when reconnects are unlimited: bound it,
        # then lift the bound (its reconnect loop reads the option on every round).
        await asyncio.wait_for(nc.connect(
            url, name=name, connect_timeout=CONNECT_TIMEOUT_S,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py says int; a float works
            max_reconnect_attempts=1, ping_interval=5, max_outstanding_pings=3,
            error_cb=errors.record, disconnected_cb=_log_disconnect, reconnected_cb=_log_reconnect,
            **options,
        ), timeout=timeout_s)
    except (OSError, nats.errors.NoServersError, *TIMEOUTS) as exc:
        errors.last = errors.last or exc
        with contextlib.suppress(Exception):
            await nc.close()
        return None
    except nats.errors.Error as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        if "connect url" not in str(exc):
            raise
        raise BusError(f"{url!r} is not a NATS URL ({str(exc).removeprefix('nats: ')}); "
                       "write nats://HOST:PORT, several joined by commas") from None
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _refusal(exc: BaseException | None) -> bool:
    """Whether a server answered and will not have us (credentials, TLS, an -ERR in the
    handshake, which nats-py raises as a plain ``nats.errors.Error``)."""
    return isinstance(exc, (nats.errors.AuthorizationError,
                            nats.errors.InvalidUserCredentialsError,
                            nats.errors.SecureConnRequiredError,
                            nats.errors.SecureConnWantedError,
                            nats.errors.SecureConnFailedError)) or type(exc) is nats.errors.Error


class Refused(BusError):
    """The server answered and refused these credentials."""


class Unreachable(BusError):
    """No NATS server answered at ``url``; ``reason`` says why, in words."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach NATS at {url}: {reason}. Start one with `jetflow up`, "
                         "or pass --nats URL.")
        self.url = url
        self.reason = reason


class _ErrorLog:
    """nats-py's error callback: logs at debug level and keeps the latest error (what a
    failed first connect reports; nats-py's own exception then says only "no servers")."""

    def __init__(self) -> None:
        self.last: BaseException | None = None
        self.refusal: BaseException | None = None  # the latest refusal among them

    async def record(self, exc: Exception) -> None:
        self.last = exc
        if _refusal(exc):  # (the server may close before the next try reads its -ERR)
            self.refusal = exc
        log.debug("nats: %s", exc)
        if "permissions violation" in str(exc).lower():
            global _violation  # noqa: PLW0603 - what a command that timed out is told
            _violation = str(exc).removeprefix("nats: ")


_violation: str | None = None


def last_violation() -> str | None:
    """The latest permissions violation the server reported to this process (a refused
    publish is only reported, asynchronously: the request it was then times out)."""
    return _violation


def _unreachable_reason(exc: BaseException | None) -> str:
    """Why a connection failed, in words (an exception's own text can be empty or say only
    "Connect call failed")."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    if exc is None or isinstance(exc, TIMEOUTS):
        return f"no answer within {CONNECT_TIMEOUT_S:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def _log_disconnect() -> None:
    log.debug("disconnected from NATS")  # also said on a normal close


async def _log_reconnect() -> None:
    log.warning("reconnected to NATS after losing the connection")


# -- streams --------------------------------------------------------------------------

EVENTS_MAX_BYTES = 4 * 1024**3  # the log's retention by default: the oldest events go first


def events_retention(environ: Mapping[str, str] = os.environ) -> tuple[int, float]:
    """(max bytes, max age in seconds; 0: none) of JF_EVENTS: ``JETFLOW_EVENTS_MAX_BYTES``
    (default 4 GiB, within nats.conf's 8 GB file store) and ``JETFLOW_EVENTS_MAX_AGE_DAYS``
    (default none). Archive what would age out with ``jetflow export --parquet``."""
    try:
        max_bytes = int(environ.get("JETFLOW_EVENTS_MAX_BYTES") or EVENTS_MAX_BYTES)
        days = float(environ.get("JETFLOW_EVENTS_MAX_AGE_DAYS") or 0)
    except ValueError as exc:
        raise BusError(f"JETFLOW_EVENTS_MAX_BYTES / _MAX_AGE_DAYS: {exc}") from None
    return max_bytes, days * 86400.0


def stream_configs(*, replicas: int = 1, dedup_window_s: float = 120.0) -> list[StreamConfig]:
    """The definitions of every jetflow stream: the only place they are written down."""
    file = StorageType.FILE
    max_bytes, max_age = events_retention()
    return [
        StreamConfig(name=S.EVENTS_STREAM, subjects=S.EVENTS_SUBJECTS,
                     retention=RetentionPolicy.LIMITS, storage=file, num_replicas=replicas,
                     duplicate_window=dedup_window_s, allow_direct=True,
                     max_bytes=max_bytes, max_age=max_age or None),
        # no_ack: a `nats req` on jf.submit.* must get the sentinel's reply, not a PubAck.
        StreamConfig(name=S.SUBMIT_STREAM, subjects=S.SUBMIT_SUBJECTS,
                     retention=RetentionPolicy.WORK_QUEUE, storage=file, no_ack=True,
                     num_replicas=replicas, duplicate_window=dedup_window_s),
        StreamConfig(name=S.LOGS_STREAM, subjects=S.LOGS_SUBJECTS, allow_direct=True,
                     retention=RetentionPolicy.LIMITS, storage=file, num_replicas=replicas,
                     max_bytes=256 * 1024 * 1024, max_age=7 * 24 * 3600.0),
        StreamConfig(name=S.HEARTBEAT_STREAM, subjects=S.HEARTBEAT_SUBJECTS,
                     retention=RetentionPolicy.LIMITS, storage=file, num_replicas=replicas,
                     max_msgs_per_subject=1, max_age=600.0),
    ]


def submit_consumer() -> ConsumerConfig:
    """The sentinels' shared durable consumer of raw submissions."""
    # A work-queue stream requires explicit acks (AckAll is refused with err 10098).
    return ConsumerConfig(name=S.SENTINEL_SUBMIT_CONSUMER, durable_name=S.SENTINEL_SUBMIT_CONSUMER,
                          ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0, max_ack_pending=20_000)


def tail_consumer(start_seq: int, filter_subjects: list[str] | None) -> ConsumerConfig:
    """An ephemeral, unacknowledged reader of a stream from ``start_seq``."""
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                          opt_start_seq=start_seq, ack_policy=AckPolicy.NONE,
                          inactive_threshold=30.0, mem_storage=True,
                          filter_subjects=filter_subjects, max_waiting=8)


# What nats-py raises when the server has no JetStream (or it does not answer).
NO_JETSTREAM = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError, *TIMEOUTS)


def no_jetstream(exc: BaseException) -> BusError:
    return BusError("JetStream is not enabled on this NATS server "
                    f"({type(exc).__name__}); start nats-server with -js, or use "
                    "`jetflow up`")


def no_stream(name: str) -> BusError:
    return BusError(f"this server has no {name} stream: no jetflow sentinel has run on it "
                    "(start one, or `jetflow up`)")


async def require_stream(js: JetStreamContext, name: str) -> StreamInfo:
    """The stream's info, or a :class:`BusError` that says why there is none (no
    JetStream on the server, or no jetflow there yet): what a command that reads the
    log checks first."""
    try:
        return await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        raise no_stream(name) from None
    except NO_JETSTREAM as exc:
        raise no_jetstream(exc) from None


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1,
                         dedup_window_s: float = 120.0) -> None:
    """Create the streams if missing; refuse clearly if JetStream is off or a stream clashes."""
    try:
        await js.account_info()
    except NO_JETSTREAM as exc:
        raise no_jetstream(exc) from None
    for config in stream_configs(replicas=replicas, dedup_window_s=dedup_window_s):
        await _ensure_stream(js, config)
    await _retire_work_stream(js)


BUCKETS = (S.SNAPSHOT_BUCKET, S.TEMPLATE_BUCKET, S.PLUGIN_BUCKET)


async def ensure_buckets(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create jetflow's object stores if missing (done by ``jetflow up`` and ``jetflow
    init``, as admin: the services may read and write them, not create them)."""
    from nats.js.api import ObjectStoreConfig

    for bucket in BUCKETS:
        try:
            await js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_object_store(bucket, ObjectStoreConfig(bucket=bucket,
                                                                   replicas=replicas))


async def _retire_work_stream(js: JetStreamContext) -> None:
    """Offers used to be stored in a JF_WORK stream; they are core NATS messages now (the
    claim is the truth, an offer is derived), and a JF_WORK stream left by an older
    jetflow would store each of them for nothing: it is deleted."""
    try:
        info = await js.stream_info(S.RETIRED_WORK_STREAM)
    except nats.js.errors.NotFoundError:
        return
    if list(info.config.subjects or []) == S.WORK_SUBJECTS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(S.RETIRED_WORK_STREAM)
            log.warning("deleted the %s stream an older jetflow made: offers are not stored "
                        "any more", S.RETIRED_WORK_STREAM)


async def _ensure_stream(js: JetStreamContext, want: StreamConfig) -> None:
    assert want.name is not None
    try:
        info = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(want)
        except nats.js.errors.BadRequestError as exc:
            raise BusError(f"cannot create stream {want.name}: {exc.description}") from None
        return
    have = info.config
    if want.max_bytes and (have.max_bytes or -1) < 0:  # an older jetflow's, unbounded
        have.max_bytes, have.max_age = want.max_bytes, want.max_age or have.max_age
        await js.update_stream(have)
        log.warning("%s had no size limit: now %d bytes (the oldest events go first)",
                    want.name, want.max_bytes)
    if want.allow_direct and not have.allow_direct:  # an older jetflow's: read by direct gets
        have.allow_direct = True
        await js.update_stream(have)
    if sorted(have.subjects or []) != sorted(want.subjects or []) \
            or have.retention != want.retention or bool(have.no_ack) != bool(want.no_ack):
        raise BusError(
            f"stream {want.name} exists with subjects={have.subjects}, "
            f"retention={have.retention}, no_ack={have.no_ack}; jetflow needs "
            f"subjects={want.subjects}, retention={want.retention}, no_ack={want.no_ack}. "
            "Delete it (nats stream rm) or use another server."
        )


# -- appending ------------------------------------------------------------------------

class PublishError(RuntimeError):
    """JetStream refused a publish; ``err_code`` is the server's error code."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


@dataclass(frozen=True, slots=True)
class Ack:
    """A stored message: its stream sequence, and whether it was a deduplicated retry
    (then ``seq`` is the original's, whose payload may differ from the one just sent)."""

    seq: int
    duplicate: bool = False


class Publisher:
    """Pipelined JetStream publishes with a bounded in-flight window.

    nats-py's ``publish_async`` leaves the future pending forever when the server answers
    with an API error (it raises inside its reply callback), so a failed expected-sequence
    append would hang; this small replacement resolves every future with the ack or a
    :class:`PublishError`, and :meth:`EventLog.settle` bounds the wait.
    """

    def __init__(self, nc: NATS, *, max_in_flight: int = 4096) -> None:
        self.nc = nc
        self._max_in_flight = max_in_flight
        self._room: asyncio.Event | None = None  # set when a full window has room again
        self._futures: dict[str, asyncio.Future[Ack]] = {}
        self._prefix = ""
        self._counter = 0

    async def _start(self) -> None:
        self._prefix = self.nc.new_inbox()
        if isinstance(self.nc, Client):  # acks read raw: no Msg, no task per ack
            await self.nc.subscribe_raw(self._prefix + ".*", self._on_raw_reply)
        else:
            await self.nc.subscribe(self._prefix + ".*", cb=self._on_reply)

    async def also_settle_on(self, pattern: str) -> None:
        """Settle acks that come on ``pattern`` too: the subjects given as ``via`` to
        :meth:`publish` (whose last token is the ack's)."""
        if isinstance(self.nc, Client):
            await self.nc.subscribe_raw(pattern, self._on_raw_reply)
        else:
            await self.nc.subscribe(pattern, cb=self._on_reply)

    async def publish(self, subject: str, payload: bytes,
                      headers: dict[str, str]) -> asyncio.Future[Ack]:
        """Publish; the future of its ack."""
        return (await self.publish_via(subject, payload, headers, None))[0]

    async def publish_via(self, subject: str, payload: bytes, headers: dict[str, str],
                          via: str | None) -> tuple[asyncio.Future[Ack], str]:
        """Publish; the future of its ack and the subject the ack comes on: under ``via``
        if given (see :meth:`also_settle_on`: someone else may listen there as well), else
        the own inbox."""
        if not self._prefix:
            await self._start()
        while len(self._futures) >= self._max_in_flight:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()
        self._counter += 1
        token = str(self._counter)
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._done(token))
        self._futures[token] = fut
        reply = f"{via or self._prefix}.{token}"
        try:
            if isinstance(self.nc, Client):  # no coroutines on the way (see publish_now)
                self.nc.publish_now(subject, payload, reply, headers)
            else:
                await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except Exception as exc:  # noqa: BLE001 - handed to whoever awaits the future
            if not fut.done():
                fut.set_exception(exc)
        return fut, reply

    def _done(self, token: str) -> None:
        self._futures.pop(token, None)
        if self._room is not None:
            self._room.set()

    async def _on_reply(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        self._settle(msg.subject.rsplit(".", 1)[-1], msg.data, status == "503")

    def _on_raw_reply(self, subject: bytes, reply: bytes, data: bytes,
                      headers: bytes | None) -> None:
        status = status_of(headers)
        self._settle(subject.rsplit(b".", 1)[-1].decode(), data,
                     status is not None and status[0] == "503")

    def _settle(self, token: str, data: bytes, no_stream: bool) -> None:
        fut = self._futures.get(token)
        if fut is None or fut.done():
            return
        ack = read_ack(data, no_stream)
        if isinstance(ack, Ack):
            fut.set_result(ack)
        else:
            fut.set_exception(ack)


def read_ack(data: bytes, no_stream: bool = False) -> Ack | PublishError:
    """What a JetStream publish's answer says: stored (an :class:`Ack`) or why not
    (``no_stream``: the answer had status 503, no stream takes the subject)."""
    if no_stream:
        return PublishError(503, 0, "no stream accepts this subject")
    try:
        body = orjson.loads(data)
        error = body.get("error")
        if error:
            return PublishError(int(error.get("code", 0)), int(error.get("err_code", 0)),
                                str(error.get("description", "")))
        return Ack(int(body["seq"]), bool(body.get("duplicate")))
    except (ValueError, TypeError, KeyError, AttributeError):
        return PublishError(0, 0, f"unreadable ack {data[:80]!r}")


@dataclass(slots=True)
class Pending:
    """An append on its way: await ``EventLog.settle`` to learn its stream sequence."""

    future: asyncio.Future[Ack]
    event: Event
    reply: str = ""  # the subject its ack comes on


@dataclass
class EventLog:
    """Appends events to JF_EVENTS, pipelined, with expected-sequence checks."""

    publisher: Publisher
    timeout_s: float = 10.0
    signer: Signer | None = None  # signs what the origin check checks (core.origin)

    async def send(self, event: Event, *, expected_seq: int | None = None,
                   msg_id: str | None = None,
                   headers: Mapping[str, str] | None = None,
                   via: str | None = None) -> Pending:
        """Start an append without waiting for its ack (bounded by the in-flight window);
        ``via``: the ack comes on a subject under it (see :meth:`Publisher.publish`)."""
        hdrs = dict(headers) if headers else {}
        hdrs[S.HDR_MSG_ID] = msg_id or f"{event.kind}:{event.id}:{event.type}:{event.at}"
        if expected_seq is not None:
            hdrs[S.HDR_EXPECTED_SUBJECT_SEQ] = str(expected_seq)
            hdrs[S.HDR_EXPECTED_SUBJECT] = S.entity_filter(event.kind, event.id)
        subject = S.event_subject(event.kind, event.id, event.type)
        body = encode_event(event)
        if self.signer is not None and needs_signature(event):
            hdrs.update(self.signer.headers(subject, body))
        fut, reply = await self.publisher.publish_via(subject, body, hdrs, via)
        return Pending(fut, event, reply)

    async def settle(self, pending: Pending) -> Ack:
        """Wait for the ack; raise Conflict if the expected sequence did not match."""
        try:
            return await asyncio.wait_for(pending.future, self.timeout_s)
        except PublishError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict(f"{pending.event.kind} {pending.event.id}: "
                               f"{exc.description}") from None
            raise

    async def settle_all(self, pendings: list[Pending]) -> list[Ack | Exception]:
        """Settle a batch against one shared deadline (a batch lost with a connection
        must not take one full timeout per append); an Ack or the error of each."""
        if pendings:
            await asyncio.wait([p.future for p in pendings], timeout=self.timeout_s)
        return [self._result(p) for p in pendings]

    @staticmethod
    def _result(pending: Pending) -> Ack | Exception:
        fut = pending.future
        if not fut.done():
            fut.cancel()
            return TimeoutError(f"no ack for {pending.event.kind} {pending.event.id} "
                                f"{pending.event.type}")
        exc = fut.exception()
        if isinstance(exc, PublishError) and exc.err_code == WRONG_LAST_SEQUENCE:
            return Conflict(f"{pending.event.kind} {pending.event.id}: {exc.description}")
        return exc if isinstance(exc, Exception) else fut.result()

    async def append(self, event: Event, *, expected_seq: int | None = None,
                     msg_id: str | None = None,
                     headers: Mapping[str, str] | None = None) -> Ack:
        pending = await self.send(event, expected_seq=expected_seq, msg_id=msg_id,
                                  headers=headers)
        return await self.settle(pending)


async def last_job_event(nc: NATS, job_id: str) -> tuple[int, str, bytes] | None:
    """(stream seq, subject, data) of the job's latest event, by direct get; None if none."""
    return await _direct_get(nc, job_id, {"last_by_subj": S.job_filter(job_id)})


async def last_event_on(nc: NATS, subject_filter: str) -> tuple[int, str, bytes] | None:
    """(stream seq, subject, data) of the latest event on ``subject_filter``, or None."""
    return await _direct_get(nc, subject_filter, {"last_by_subj": subject_filter})


async def job_event_of_type(nc: NATS, job_id: str, type_: str
                            ) -> tuple[int, str, bytes] | None:
    """(stream seq, subject, data) of the job's latest event of this type (its one
    ``submitted``, say), by direct get; None if it has none."""
    return await _direct_get(nc, job_id,
                             {"last_by_subj": S.event_subject("job", job_id, type_)})


async def job_messages_after(nc: NATS, job_id: str, seq: int,
                             limit: int = 1000) -> list[tuple[int, str, bytes]]:
    """(stream seq, subject, data) of each message on the job's subjects after ``seq``, in
    order, by direct gets (at most ``limit``)."""
    found: list[tuple[int, str, bytes]] = []
    while len(found) < limit:
        got = await _direct_get(nc, job_id, {"seq": seq + 1,
                                             "next_by_subj": S.job_filter(job_id)})
        if got is None:
            break
        found.append(got)
        seq = got[0]
    return found


DIRECT_BATCH = 256  # messages per batched direct get
DIRECT_HEADERS = ("Nats-Stream", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Subject",
                  "Nats-Num-Pending", "Nats-Last-Sequence")


async def messages_on(js: JetStreamContext, filters: list[str], start_seq: int = 1,
                      stream: str = S.EVENTS_STREAM) -> list[Msg]:
    """Every message of ``stream`` (JF_EVENTS) on any of ``filters`` from ``start_seq``,
    in stream order, by batched direct gets: a read creates nothing on the server (a
    submitter may read, and may not create consumers). :func:`stored_seq` is a message's
    stream sequence."""
    msgs: list[Msg] = []
    for subject_filter in dict.fromkeys(filters):
        msgs.extend(await _direct_scan(js._nc, stream, subject_filter, start_seq))
    if len(filters) > 1:
        msgs.sort(key=stored_seq)
    return msgs


def stored_seq(msg: Msg) -> int:
    """The stream sequence of a message read by :func:`messages_on` or a consumer."""
    headers = msg.headers or {}
    seq = headers.get("Nats-Sequence")
    return int(seq) if seq is not None else parse_ack_reply(msg.reply).stream_seq


async def _direct_scan(nc: NATS, stream: str, subject_filter: str,
                       start_seq: int) -> list[Msg]:
    """The messages on ``subject_filter`` from ``start_seq``: batched direct gets (each
    answered by up to :data:`DIRECT_BATCH` messages, then an end-of-batch status)."""
    found: list[Msg] = []
    seq = max(1, start_seq)
    while True:
        batch, more = await _direct_batch(nc, stream, subject_filter, seq)
        found.extend(batch)
        if not more or not batch:
            return found
        seq = stored_seq(batch[-1]) + 1


async def _direct_batch(nc: NATS, stream: str, subject_filter: str,
                        seq: int) -> tuple[list[Msg], bool]:
    """One batch from ``seq``, and whether more may follow."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await queue.put(msg)

    sub = await nc.subscribe(inbox, cb=on_msg)
    request = json.dumps({"seq": seq, "next_by_subj": subject_filter,
                          "batch": DIRECT_BATCH}).encode()
    out: list[Msg] = []
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), 5.0)
            except TimeoutError:
                raise BusError(f"no answer reading {stream} ({subject_filter}): is "
                               "JetStream on, and may these credentials read it?") from None
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "204":  # end of batch
                return out, int(headers.get("Nats-Num-Pending") or 0) > 0
            if status == "404":
                return out, False
            if status == "503":  # no responders: no JetStream, or no such stream
                await require_stream(nc.jetstream(), stream)
                raise BusError(f"stream {stream} does not answer direct gets (allow_direct "
                               "is off: `jetflow up` or a jetflow service turns it on)")
            if status:
                raise BusError(f"reading {stream} ({subject_filter}) failed: {status} "
                               f"{headers.get('Description', '')}")
            out.append(Msg(nc, subject=headers.get("Nats-Subject", msg.subject), reply="",
                           data=msg.data, headers=headers))
    finally:
        await sub.unsubscribe()


async def event_at(nc: NATS, seq: int) -> tuple[int, str, bytes] | None:
    """(stream seq, subject, data) of the message stored at ``seq`` in JF_EVENTS, or None
    if there is none (deleted, aged out, or not yet written)."""
    return await _direct_get(nc, f"seq {seq}", {"seq": seq})


async def _direct_get(nc: NATS, job_id: str, query: dict[str, object]
                      ) -> tuple[int, str, bytes] | None:
    request = json.dumps(query).encode()
    try:
        msg = await nc.request(f"$JS.API.DIRECT.GET.{S.EVENTS_STREAM}", request, 5.0)
    except nats.errors.NoRespondersError as exc:  # no JetStream (or no such stream)
        raise no_jetstream(exc) from None
    headers = msg.headers or {}
    if headers.get("Status") == "404":
        return None
    if headers.get("Status"):
        raise BusError(f"direct get of {job_id} failed: {headers.get('Status')} "
                       f"{headers.get('Description', '')}")
    return int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data


# -- tailing --------------------------------------------------------------------------

class Tail:
    """Reads a stream from a sequence onwards, in batches, for as long as it is iterated.

    An ephemeral pull consumer with no acks; if it vanishes (server restart, a network cut
    longer than its inactivity threshold) or fetch fails, a new one starts right after the
    last sequence seen, so a restart loses and repeats nothing. ``caught_up`` is true once
    a batch ended with nothing pending.
    """

    def __init__(self, js: JetStreamContext, stream: str, *, start_seq: int = 1,
                 filter_subjects: list[str] | None = None, batch: int = 256,
                 idle_s: float = 1.0) -> None:
        self.js = js
        self.stream = stream
        self.next_seq = max(1, start_seq)
        self.filter_subjects = filter_subjects
        self.batch = batch
        self.idle_s = idle_s
        self.caught_up = False
        self._sub: JetStreamContext.PullSubscription | None = None
        self._epoch = 0

    async def batches(self) -> AsyncIterator[list[Msg]]:
        """Yield non-empty batches; yield [] after an idle period, so callers can tick."""
        while True:
            msgs = await self._fetch()
            if msgs:
                last = parse_ack_reply(msgs[-1].reply)
                self.next_seq = last.stream_seq + 1
                self.caught_up = last.pending == 0
            yield msgs

    async def _fetch(self) -> list[Msg]:
        nc = self.js._nc
        try:
            if self._sub is not None and reconnects(nc) != self._epoch:
                await self.close()  # a subscription from before a reconnect may be dead
            if self._sub is None:
                self._epoch = reconnects(nc)
                self._sub = await self._subscribe()
            return await self._sub.fetch(self.batch, timeout=self.idle_s)
        except TIMEOUTS:
            self.caught_up = True
            await self._check_consumer()
            return []
        except Exception as exc:  # noqa: BLE001 - any failure: start a fresh consumer
            log.warning("tail of %s failed (%s: %s); resubscribing at %d", self.stream,
                        type(exc).__name__, exc, self.next_seq)
            await self.close()
            await asyncio.sleep(0.5)
            return []

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        config = tail_consumer(self.next_seq, self.filter_subjects)
        # An empty subject (and no filter) means the whole stream.
        return await self.js.pull_subscribe("", stream=self.stream, config=config,
                                            pending_msgs_limit=4 * self.batch + 64)

    async def _check_consumer(self) -> None:
        if self._sub is None:
            return
        try:
            await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            log.warning("tail consumer on %s is gone; resubscribing at %d", self.stream,
                        self.next_seq)
            await self.close()
        except Exception:  # noqa: BLE001 - disconnected: fetch will retry
            pass

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # already gone with the connection
                await sub.unsubscribe()
