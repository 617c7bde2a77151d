"""Raw subscriptions (jetflow.adapters.natsclient) against a real nats-server: the wire's
bytes reach the callback untouched, other subscriptions on the connection are not affected, and the
bulk reader and the replay's reading child work through them."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from jetflow.adapters.bus import connect, ensure_streams
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.reader import StreamReader, StreamUnreadable
from jetflow.core import subjects as S
from jetflow.core.metadata import Stored, header_value, status_of
from jetflow.projections.applier import Applier
from jetflow.projections.fetcher import Bounds, FetchError, fetch
from jetflow.projections.replay import rebuild
from tests.test_projections_e2e import publish_synthetic

Wire = tuple[bytes, bytes, bytes, bytes | None]


async def test_raw_subscription_gets_the_wire_bytes(server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    got: list[Wire] = []
    plain: list[bytes] = []
    try:
        sub = await nc.subscribe_raw("raw.>", lambda *wire: got.append(wire))
        await nc.subscribe("raw.>", cb=partial(_append, plain))
        await nc.publish("raw.a", b"one", reply="r.1",
                         headers={"traceparent": "00-ab-cd-01", "X": "\u00e9"})
        await nc.publish("raw.b", b"two")
        await nc.flush()
        await _until(lambda: len(got) == 2 and len(plain) == 2)
        (subject, reply, data, headers), second = got
        assert (subject, reply, data) == (b"raw.a", b"r.1", b"one")
        assert header_value(headers, "traceparent") == "00-ab-cd-01"
        assert header_value(headers, "X") == "\u00e9" and status_of(headers) is None
        assert second == (b"raw.b", b"", b"two", None)
        assert plain == [b"one", b"two"]  # an ordinary subscription still gets Msgs

        await nc.unsubscribe_raw(sub)
        await nc.publish("raw.c", b"three")
        await nc.flush()
        await _until(lambda: len(plain) == 3)
        assert len(got) == 2
    finally:
        await nc.close()


async def _append(out: list[bytes], msg: Msg) -> None:
    out.append(msg.data)


async def raw_publish(url: str, subject: bytes, payload: bytes) -> None:
    """Publish as a client in another language could: any bytes in the subject."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false}\r\nPUB ' + subject
                     + b" %d\r\n" % len(payload) + payload + b"\r\nPING\r\n")
        await writer.drain()
        assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()


async def test_a_subject_that_is_not_utf8_does_not_break_the_connection(
        server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    raw: list[Wire] = []
    plain: list[Msg] = []
    try:
        await nc.subscribe_raw("odd.>", lambda *wire: raw.append(wire))

        async def keep(msg: Msg) -> None:
            plain.append(msg)
        await nc.subscribe("odd.>", cb=keep)
        await nc.flush()
        await raw_publish(server.url, b"odd.\xff\xfe", b"bad")
        await nc.publish("odd.fine", b"good")
        await _until(lambda: len(raw) == 2 and len(plain) == 2)
        assert [w[0] for w in raw] == [b"odd.\xef\xbf\xbd\xef\xbf\xbd", b"odd.fine"]
        assert [(m.subject, m.data) for m in plain] == [("odd.\ufffd\ufffd", b"bad"),
                                                        ("odd.fine", b"good")]
        assert nc.stats["reconnects"] == 0
    finally:
        await nc.close()


async def test_a_raw_callback_that_raises_does_not_stop_the_connection(
        server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    plain: list[bytes] = []
    try:
        def explode(*_wire: bytes | None) -> None:
            raise RuntimeError("a bug in a raw callback")
        await nc.subscribe_raw("boom", explode)
        await nc.subscribe("after", cb=partial(_append, plain))
        await nc.publish("boom", b"x")
        await nc.publish("after", b"still here")
        await nc.flush()
        await _until(lambda: plain == [b"still here"])
        assert nc.stats["reconnects"] == 0
    finally:
        await nc.close()


async def _until(check: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_reader_yields_stored_messages_with_headers_and_times(
        server: EmbeddedServer) -> None:
    head = await publish_synthetic(server.url, 1200)
    nc = await connect(server.url)
    reader = StreamReader(nc, S.EVENTS_STREAM, batch=500, idle_s=0.2)
    msgs = []
    try:
        async for batch in reader.batches():
            msgs += batch
            if reader.next_seq > head:
                break
    finally:
        await reader.close()
        await nc.close()
    assert [m.seq for m in msgs] == list(range(1, head + 1))
    assert all(m.subject.startswith("jf.") and m.data.startswith(b"{") for m in msgs)
    times = [m.time_ns for m in msgs]
    assert times == sorted(times) and times[0] > 1_600_000_000 * 10**9
    assert any(m.header(S.HDR_TRACEPARENT) for m in msgs)  # synthetic appends carry them


async def test_fetcher_child_reads_up_to_its_bounds(server: EmbeddedServer) -> None:
    head = await publish_synthetic(server.url, 2500)
    got = [m async for batch in fetch(server.url, 101, Bounds(2000), batch=300)
           for m in batch]
    assert [m.seq for m in got] == list(range(101, 2001)) and head > 2000
    everything = [m async for batch in fetch(server.url, 1, Bounds(head)) for m in batch]
    cut = everything[1199].time_ns  # time travel: stop at a store time
    timed = [m async for batch in fetch(server.url, 1, Bounds(head, cut)) for m in batch]
    assert timed[-1].time_ns <= cut and len(timed) >= 1200
    assert all(m.time_ns > cut for m in everything[len(timed):])


async def test_fetcher_child_failure_is_an_error_not_a_short_replay(
        server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    await ensure_streams(nc.jetstream())
    await nc.close()
    url = server.url
    await server.stop()  # the child cannot connect: it must fail loudly
    try:
        async with asyncio.timeout(30):
            async for _batch in fetch(url, 1, Bounds(10)):
                raise AssertionError("no batch can come from a stopped server")
    except FetchError as exc:
        assert "exit code" in str(exc)
    else:
        raise AssertionError("fetch ended quietly")


async def test_a_stored_subject_that_is_not_utf8_is_read_like_any_other(
        server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    await ensure_streams(nc.jetstream())
    await raw_publish(server.url, b"jf.job.\xff.submitted", b"{}")
    await nc.jetstream().publish("jf.job.j1.progress", b"{}")
    reader = StreamReader(nc, S.EVENTS_STREAM, batch=100, idle_s=0.2)
    got: list[Stored] = []
    try:
        async with asyncio.timeout(10):
            async for batch in reader.batches():
                got += batch
                if len(got) >= 2:
                    break
    finally:
        await reader.close()
        await nc.close()
    assert [(m.seq, m.subject) for m in got] == [(1, "jf.job.\ufffd.submitted"),
                                                 (2, "jf.job.j1.progress")]


async def test_reader_with_a_deadline_gives_up_when_the_server_is_gone(
        server: EmbeddedServer) -> None:
    await publish_synthetic(server.url, 300)
    nc = await connect(server.url)
    reader = StreamReader(nc, S.EVENTS_STREAM, batch=100, idle_s=0.2, give_up_s=2.0)
    seen = 0
    try:
        with pytest.raises(StreamUnreadable, match="cannot read JF_EVENTS from seq 101"):
            async with asyncio.timeout(30):
                async for batch in reader.batches():
                    seen += len(batch)
                    if seen == 100:
                        await server.kill()
    finally:
        await reader.close()
        with contextlib.suppress(OSError):  # nats-py's close, on a connection reset
            await nc.close()
    assert seen == 100


async def test_fetch_fails_when_the_server_goes_away_mid_read(server: EmbeddedServer) -> None:
    await publish_synthetic(server.url, 3000)
    batches = 0
    with pytest.raises(FetchError, match="exit code 1"):
        async with asyncio.timeout(60):
            async for _batch in fetch(server.url, 1, Bounds(3000), batch=500, give_up_s=2.0):
                batches += 1
                if batches == 1:
                    await server.kill()
    assert 1 <= batches < 6  # what the child had already read may still arrive
    assert fetcher_processes() == []


def fetcher_processes() -> list[int]:
    """Running `python -m jetflow.projections.fetcher` children of this test process."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                if b"jetflow.projections.fetcher" in cmdline:
                    found.append(int(proc.name))
    return found


async def test_a_failing_replay_stops_its_reading_child(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await publish_synthetic(server.url, 3000)
    calls = 0

    def apply_then_fail(self: Applier, batch: list[Stored]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk full")
        original(self, batch)

    original = Applier.apply
    monkeypatch.setattr(Applier, "apply", apply_then_fail)
    nc = await connect(server.url)
    try:
        with pytest.raises(OSError, match="disk full"):
            await rebuild(nc, tmp_path / "r.sqlite", batch=500)
    finally:
        await nc.close()
    assert calls == 2 and fetcher_processes() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srv"]  # no half-built file
