"""``Client.publish_now`` (jetflow.adapters.natsclient): nats-py's publish without its
coroutines, against a real nats-server. What it puts on the wire is what ``publish``
puts there, byte for byte, and it refuses what ``publish`` refuses."""

from __future__ import annotations

import asyncio

import pytest
from nats import errors

from jetflow.adapters.bus import connect
from jetflow.adapters.nats_server import EmbeddedServer

Wire = tuple[bytes, bytes, bytes, bytes | None]


async def _until(pred: object, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.e2e
async def test_publish_now_puts_on_the_wire_what_publish_does(server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    got: list[Wire] = []
    try:
        await nc.subscribe_raw("now.>", lambda *wire: got.append(wire))
        await nc.flush()
        cases: list[tuple[str, bytes, str, dict[str, str] | None]] = [
            ("now.plain", b"one", "", None),
            ("now.reply", b"", "inbox.1", None),
            ("now.headers", b'{"x": 1}', "inbox.2",
             {"Nats-Msg-Id": "m1", " traceparent ": " 00-ab-cd-01 ", "X": "\u00e9t\u00e9",
              "": "skipped", "Multi": "a\r\nb\nc"}),
            ("now.big", b"z" * 300_000, "", {"A": "1"}),
        ]
        for subject, payload, reply, headers in cases:
            nc.publish_now(subject, payload, reply, headers)
            await nc.publish(subject, payload, reply=reply, headers=headers)
        await nc.flush()
        await _until(lambda: len(got) == 2 * len(cases))
        for i in range(len(cases)):
            mine, theirs = got[2 * i], got[2 * i + 1]
            assert mine == theirs
        assert got[4][3] is not None and b"traceparent: 00-ab-cd-01\r\n" in got[4][3]
        assert b"Multi: a  b c\r\n" in (got[4][3] or b"")
    finally:
        await nc.close()


@pytest.mark.e2e
async def test_publish_now_refuses_what_publish_refuses(server: EmbeddedServer) -> None:
    nc = await connect(server.url)
    try:
        for subject, reply in (("", ""), ("a b", ""), ("a\r\nPUB x 1", ""), ("ok", "r\tx")):
            with pytest.raises(errors.BadSubjectError):
                nc.publish_now(subject, b"x", reply)
        with pytest.raises(errors.BadHeaderError):
            nc.publish_now("ok", b"x", headers={"bad key": "v"})
        with pytest.raises(errors.BadHeaderError):  # checked every time, not only once
            nc.publish_now("ok", b"x", headers={"bad:key": "v"})
        with pytest.raises(errors.MaxPayloadError):
            nc.publish_now("ok", b"x" * (nc.max_payload + 1))
        nc.publish_now("still.fine", b"x")
        await nc.flush()
    finally:
        await nc.close()
    with pytest.raises(errors.ConnectionClosedError):
        nc.publish_now("ok", b"x")


@pytest.mark.e2e
async def test_an_answer_that_cannot_be_sent_does_not_stop_the_sentinels_loop(
        server: EmbeddedServer) -> None:
    """The sentinel answers requests with publish_now from the loops that observe events:
    an answer its connection cannot take (closed here; away with its buffer full in
    life) is dropped, not raised into the loop."""
    from jetflow.core.events import Event
    from jetflow.sentinel.service import Sentinel

    sentinel = Sentinel(server.url)
    sentinel.nc = await connect(server.url)
    await sentinel.nc.close()
    sentinel.replies.expect("fp-1", "_INBOX.gone.1")
    event = Event("job", "j1", "submitted", 0.0, {"fp": "fp-1", "msg_id": "m1"}, seq=7)
    sentinel._answer(event)  # no exception
    assert not sentinel.replies.is_waiting("fp-1", "_INBOX.gone.1")  # it was answered
