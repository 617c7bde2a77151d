"""The event codec: encode -> decode is the identity, and every malformed message is
refused with the right machine-readable code. Also the ack-reply metadata parser."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetflow.core.codec import MAX_EVENT_BYTES, CodecError, decode_event, dumps, encode_event, loads
from jetflow.core.events import FIELDS, SCHEMA_VERSION, Event, stored_event
from jetflow.core.job import JobState, apply
from jetflow.core.metadata import (
    Delivery,
    ack_numbers,
    header_block,
    header_value,
    parse_ack_reply,
    status_of,
)
from jetflow.core.subjects import event_subject

PROPERTY = settings(max_examples=200, deadline=None)

# -- strategies ---------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9_\-:]{1,128}", fullmatch=True)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # valid UTF-8
ints = st.integers(-(2**53), 2**53)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
json_scalars = st.none() | st.booleans() | ints | floats | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(texts, json_values, max_size=5)

BY_TYPE: dict[type, st.SearchStrategy[Any]] = {
    int: ints,
    float: floats,
    str: texts,
    bool: st.booleans(),
    dict: json_objects,
    list: st.lists(texts, max_size=5),
}

KINDS_AND_TYPES = sorted((kind, type_) for kind, types in FIELDS.items() for type_ in types)


def field_value(types: tuple[type, ...]) -> st.SearchStrategy[Any]:
    return st.one_of(*(BY_TYPE[t] for t in types))


@st.composite
def events(draw: st.DrawFn, kind: str | None = None, type_: str | None = None) -> Event:
    if kind is None or type_ is None:
        kind, type_ = draw(st.sampled_from(KINDS_AND_TYPES))
    required = FIELDS[kind][type_]
    data = {name: draw(field_value(types)) for name, types in required.items()}
    extra = draw(st.dictionaries(texts.filter(lambda k: k not in required), json_values,
                                 max_size=3))
    data.update(extra)  # optional fields of later versions ride along untouched
    at = draw(st.floats(min_value=0, max_value=4e9) | st.integers(0, 4_000_000_000))
    return Event(kind, draw(ids), type_, at, data)


def subject_of(event: Event) -> str:
    return event_subject(event.kind, event.id, event.type)


# -- identity -----------------------------------------------------------------------------

def test_every_kind_with_types_is_covered() -> None:
    assert {k for k, _ in KINDS_AND_TYPES} == {"job", "worker", "wf", "plugin"}
    assert len(KINDS_AND_TYPES) == sum(len(FIELDS[k]) for k in ("job", "worker", "wf",
                                                                 "plugin"))


@pytest.mark.parametrize(("kind", "type_"), KINDS_AND_TYPES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_encode_decode_is_identity_for_each_type(kind: str, type_: str,
                                                 data: st.DataObject) -> None:
    event = data.draw(events(kind, type_))
    seq = data.draw(st.integers(0, 2**40))
    decoded = decode_event(subject_of(event), encode_event(event), seq)
    assert decoded == replace(event, seq=seq)
    assert decoded.v == SCHEMA_VERSION
    assert isinstance(decoded.at, float)
    assert encode_event(decoded) == encode_event(replace(event, at=float(event.at)))


@PROPERTY
@given(events())
def test_encode_decode_is_identity(event: Event) -> None:
    raw = encode_event(event)
    assert len(raw) <= MAX_EVENT_BYTES
    assert decode_event(subject_of(event), raw) == event


def test_envelope_is_the_public_contract() -> None:
    e = Event("job", "j1", "started", 12.5, {"attempt": 1, "worker": "w1", "lease_s": 15})
    assert orjson.loads(encode_event(e)) == {
        "type": "started", "job_id": "j1", "v": 2, "at": 12.5,
        "data": {"attempt": 1, "worker": "w1", "lease_s": 15},
    }
    w = Event("worker", "w1", "lost", 3, {"reason": "silent"})
    assert orjson.loads(encode_event(w))["worker_id"] == "w1"


def test_dumps_and_loads() -> None:
    assert loads(dumps({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}
    with pytest.raises(CodecError) as info:
        loads(b"{")
    assert info.value.code == "invalid_json"


# -- rejections ---------------------------------------------------------------------------

SUBJECT = "jf.job.j1.queued"


def envelope(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "queued", "job_id": "j1", "v": 1, "at": 10.0,
                            "data": {"attempt": 1}}
    body.update(over)
    return body


def without(key: str) -> dict[str, Any]:
    body = envelope()
    del body[key]
    return body


def code_of(subject: str, raw: bytes) -> str:
    with pytest.raises(CodecError) as info:
        decode_event(subject, raw)
    assert info.value.message and str(info.value) == info.value.message
    return info.value.code


def test_the_reference_envelope_is_valid() -> None:
    e = decode_event(SUBJECT, orjson.dumps(envelope()), 7)  # a v1 envelope, read as today's
    assert e == Event("job", "j1", "queued", 10.0, {"attempt": 1}, SCHEMA_VERSION, 7)


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"type": "queued",}', b"\xff\xfe",
                                 b"{'single': 'quotes'}", b"NaN"])
def test_invalid_json(raw: bytes) -> None:
    assert code_of(SUBJECT, raw) == "invalid_json"


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b'"queued"', b"1", b"null", b"true"])
def test_not_an_object(raw: bytes) -> None:
    assert code_of(SUBJECT, raw) == "not_object"


@pytest.mark.parametrize("subject", ["jf.job.j1.exploded", "jf.worker.w1.queued",
                                     "jf.wf.w1.exploded", "jf.plugin.p1.exploded",
                                     "jf.job.j1.Queued"])
def test_unknown_type(subject: str) -> None:
    kind, id_, type_ = subject.split(".")[1:]
    body = envelope(type=type_, **{f"{kind}_id": id_})
    assert code_of(subject, orjson.dumps(body)) == "unknown_type"


@pytest.mark.parametrize(
    "body",
    [
        envelope(type="started"),        # subject says queued
        envelope(type=None),
        without("type"),
        envelope(job_id="j2"),           # subject says j1
        envelope(job_id=None),
        without("job_id"),
    ],
    ids=["type", "type-null", "type-missing", "id", "id-null", "id-missing"],
)
def test_subject_and_envelope_must_agree(body: dict[str, Any]) -> None:
    assert code_of(SUBJECT, orjson.dumps(body)) == "mismatch"


def test_id_key_follows_the_kind() -> None:
    body = {"type": "lost", "job_id": "w1", "v": 1, "at": 1.0, "data": {"reason": "x"}}
    assert code_of("jf.worker.w1.lost", orjson.dumps(body)) == "mismatch"
    body["worker_id"] = body.pop("job_id")
    assert decode_event("jf.worker.w1.lost", orjson.dumps(body)).id == "w1"


@pytest.mark.parametrize("v", [0, -1, SCHEMA_VERSION + 1, "1", 1.0, True, None, [1]])
def test_bad_version(v: Any) -> None:
    assert code_of(SUBJECT, orjson.dumps(envelope(v=v))) == "bad_version"


def test_missing_version() -> None:
    assert code_of(SUBJECT, orjson.dumps(without("v"))) == "bad_version"


@pytest.mark.parametrize("at", [-1, -0.5, "now", None, True, [1.0]])
def test_bad_time(at: Any) -> None:
    assert code_of(SUBJECT, orjson.dumps(envelope(at=at))) == "bad_time"


def test_missing_time() -> None:
    assert code_of(SUBJECT, orjson.dumps(without("at"))) == "bad_time"


@pytest.mark.parametrize("data", [None, [], "x", 1])
def test_data_must_be_an_object(data: Any) -> None:
    assert code_of(SUBJECT, orjson.dumps(envelope(data=data))) == "bad_data"


def test_missing_data() -> None:
    assert code_of(SUBJECT, orjson.dumps(without("data"))) == "bad_data"


_SAMPLE: dict[type, Any] = {int: 3, float: 1.5, str: "s", bool: False, dict: {"k": 1},
                            list: ["echo"]}
_WRONG: list[Any] = [1, 1.5, "1", True, {"a": 1}, [1]]


@pytest.mark.parametrize(("kind", "type_"), KINDS_AND_TYPES)
def test_every_required_field_is_required(kind: str, type_: str) -> None:
    good = {name: _SAMPLE[types[0]] for name, types in FIELDS[kind][type_].items()}
    body = {"type": type_, f"{kind}_id": "x1", "v": 1, "at": 1.0, "data": good}
    subject = event_subject(kind, "x1", type_)
    assert decode_event(subject, orjson.dumps(body)).data == good
    for name, types in FIELDS[kind][type_].items():
        missing = {k: v for k, v in good.items() if k != name}
        assert code_of(subject, orjson.dumps({**body, "data": missing})) == "bad_field"
        assert code_of(subject, orjson.dumps({**body, "data": {**good, name: None}})) \
            == "bad_field"
        for wrong in _WRONG:
            if type(wrong) not in types:
                bad = {**body, "data": {**good, name: wrong}}
                assert code_of(subject, orjson.dumps(bad)) == "bad_field", (name, wrong)


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempt", "1"), ("attempt", True), ("attempt", 1.0), ("attempt", [1])],
)
def test_field_types_are_exact(field: str, value: Any) -> None:
    body = envelope(data={field: value})
    assert code_of(SUBJECT, orjson.dumps(body)) == "bad_field"


def test_numbers_accept_int_and_float() -> None:
    for lease in (15, 15.5):
        body = {"type": "started", "job_id": "j1", "v": 1, "at": 1,
                "data": {"attempt": 1, "worker": "w", "lease_s": lease}}
        assert decode_event("jf.job.j1.started", orjson.dumps(body)).data["lease_s"] == lease


def test_oversize_is_refused_on_decode() -> None:
    big = orjson.dumps(envelope(data={"attempt": 1, "pad": "x" * MAX_EVENT_BYTES}))
    assert len(big) > MAX_EVENT_BYTES
    assert code_of(SUBJECT, big) == "too_large"
    assert code_of(SUBJECT, b" " * (MAX_EVENT_BYTES + 1)) == "too_large"  # before parsing


def test_oversize_is_refused_on_encode() -> None:
    e = Event("job", "j1", "queued", 1.0, {"attempt": 1, "pad": "x" * MAX_EVENT_BYTES})
    with pytest.raises(CodecError) as info:
        encode_event(e)
    assert info.value.code == "too_large"


def test_just_under_the_limit_is_fine() -> None:
    body = envelope()
    overhead = len(orjson.dumps({**body, "data": {"attempt": 1, "pad": ""}}))
    body["data"] = {"attempt": 1, "pad": "x" * (MAX_EVENT_BYTES - overhead)}
    raw = orjson.dumps(body)
    assert len(raw) == MAX_EVENT_BYTES
    assert decode_event(SUBJECT, raw).data["attempt"] == 1


@pytest.mark.parametrize("subject", ["", "jf", "jf.job.j1", "jf.job.j1.queued.extra",
                                     "xx.job.j1.queued", "jf.nope.j1.queued",
                                     "jf.submit.default", "JF.job.j1.queued",
                                     "jf.job.>"])
def test_bad_subject_shape(subject: str) -> None:
    assert code_of(subject, orjson.dumps(envelope())) == "bad_subject"


def test_subject_is_checked_before_size_and_json() -> None:
    assert code_of("nope", b"{") == "bad_subject"
    assert code_of("nope", b" " * (MAX_EVENT_BYTES + 1)) == "bad_subject"


@PROPERTY
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_codec_error(raw: bytes) -> None:
    try:
        event = decode_event(SUBJECT, raw)
    except CodecError as exc:
        assert exc.code in {"invalid_json", "not_object", "mismatch", "bad_version", "bad_time",
                            "bad_data", "bad_field"}
    else:
        assert event.type == "queued" and event.id == "j1"


# envelopes with each key missing, right or arbitrary
near_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["queued", "started"]) | json_values,
        "job_id": st.sampled_from(["j1", "j2"]) | json_values,
        "v": st.sampled_from([1, 2]) | json_values,
        "at": st.sampled_from([0, 1.5]) | json_values,
        "data": st.fixed_dictionaries({}, optional={"attempt": ints | json_values})
        | json_values,
    },
)


@PROPERTY
@given(json_values | near_envelopes)
def test_arbitrary_json_decodes_or_raises_codec_error(value: Any) -> None:
    try:
        event = decode_event(SUBJECT, orjson.dumps(value))
    except CodecError as exc:
        assert exc.code != "bad_subject"
    else:  # accepted: then it really is a well-formed queued event of j1
        assert (event.kind, event.id, event.type) == ("job", "j1", "queued")
        assert type(event.data["attempt"]) is int and event.at >= 0


# -- ack reply metadata -------------------------------------------------------------------

def test_ack_reply_nine_tokens() -> None:
    reply = "$JS.ACK.JF_EVENTS.jf-projector.1.42.40.1700000000123456789.7"
    assert parse_ack_reply(reply) == Delivery(stream="JF_EVENTS", stream_seq=42,
                                              timestamp_ns=1700000000123456789, pending=7)


def test_ack_reply_twelve_tokens() -> None:
    reply = ("$JS.ACK.hub.ACCOUNTHASH.JF_EVENTS.jf-projector.3.42.40."
             "1700000000123456789.7.Yz3Ab9")
    assert parse_ack_reply(reply) == Delivery(stream="JF_EVENTS", stream_seq=42,
                                              timestamp_ns=1700000000123456789, pending=7)


def test_ack_reply_tolerates_tokens_added_later() -> None:
    """ADR-15 (and nats-py) allow more tokens after the 12th: they are ignored."""
    reply = "$JS.ACK.hub.ACC.JF_EVENTS.c.1.42.40.1700000000000000000.7.tok.future"
    assert parse_ack_reply(reply) == Delivery("JF_EVENTS", 42, 1700000000000000000, 7)


def test_ack_reply_eleven_tokens() -> None:
    reply = "$JS.ACK._.ACC.JF_SUBMIT.jf-sentinel-submit.1.9.9.1700000000000000000.0"
    assert parse_ack_reply(reply) == Delivery("JF_SUBMIT", 9, 1700000000000000000, 0)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "_INBOX.abc123",
        "$JS.API.CONSUMER.INFO.JF_EVENTS.c",
        "$JS.ACK.JF_EVENTS.c.1.42.40.1700000000000000000",           # 8 tokens
        "$JS.ACK.d.a.JF_EVENTS.c.1.42.40.1700000000000000000",       # 10 tokens
        "$JS.NAK.JF_EVENTS.c.1.42.40.1700000000000000000.7",
        "$JS.ACK.JF_EVENTS.c.1.seq.40.1700000000000000000.7",       # not a number
    ],
)
def test_ack_reply_of_another_shape_raises_value_error(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_ack_reply(reply)
    with pytest.raises(ValueError):
        ack_numbers(reply.encode())


@pytest.mark.parametrize("reply", [
    "$JS.ACK.JF_EVENTS.c1.1.1234.77.1795319285788380563.5",
    "$JS.ACK.dom.acc.JF_EVENTS.c1.1.1234.77.1795319285788380563.5",
    "$JS.ACK.dom.acc.JF_EVENTS.c1.1.1234.77.1795319285788380563.5.tok",
])
def test_ack_numbers_read_the_wire_bytes_like_parse_ack_reply(reply: str) -> None:
    """(stream seq, consumer seq, stored time, pending): what the bulk reader needs."""
    delivery = parse_ack_reply(reply)
    assert ack_numbers(reply.encode()) == (delivery.stream_seq, 77, delivery.timestamp_ns,
                                           delivery.pending) == (1234, 77,
                                                                 1795319285788380563, 5)


# -- header blocks ---------------------------------------------------------------------------

def test_header_value_reads_one_header_of_a_block() -> None:
    block = b"NATS/1.0\r\nNats-Msg-Id: a:1\r\ntraceparent:  00-ab-cd-01 \r\nX: \xc3\xa9\r\n\r\n"
    assert header_value(block, "traceparent") == "00-ab-cd-01"
    assert header_value(block, "Nats-Msg-Id") == "a:1"
    assert header_value(block, "X") == "é"
    assert header_value(block, "missing") is None
    assert header_value(None, "traceparent") is None
    assert header_value(b"NATS/1.0\r\n\r\n", "traceparent") is None


def test_header_block_round_trips_through_header_value() -> None:
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
               "Jf-Correlation-Id": "order-7"}
    block = header_block(headers)
    assert block.startswith(b"NATS/1.0\r\n") and block.endswith(b"\r\n\r\n")
    assert {k: header_value(block, k) for k in headers} == headers
    assert status_of(block) is None


@pytest.mark.parametrize(("block", "status"), [
    (b"NATS/1.0 404 No Messages\r\n\r\n", ("404", "No Messages")),
    (b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n",
     ("408", "Request Timeout")),
    (b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", ("100", "Idle Heartbeat")),
    (b"NATS/1.0 503\r\n\r\n", ("503", "")),
    (b"NATS/1.0\r\nStatus: 404\r\n\r\n", None),  # a header, not a status line
    (None, None),
])
def test_status_of_a_header_block(block: bytes | None, status: tuple[str, str] | None) -> None:
    assert status_of(block) == status


def test_stored_event_builds_the_same_event_as_the_constructor() -> None:
    """The codec's fast constructor sets every field, in the dataclass's order."""
    assert [f.name for f in dataclasses.fields(Event)] == ["kind", "id", "type", "at", "data",
                                                           "v", "seq"]
    args = ("job", "j1", "started", 12.5, {"attempt": 1}, 1, 42)
    fast, slow = stored_event(*args), Event(*args)
    assert fast == slow and hash(fast.kind) == hash(slow.kind) and type(fast) is Event
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.seq = 7  # type: ignore[misc]


def test_a_v1_event_still_reads_and_a_v1_submitted_still_waits_to_be_queued() -> None:
    """v2 added ``queued`` to ``submitted``; a log written by v1 replays as it did."""
    body = {"type": "submitted", "job_id": "j1", "v": 1, "at": 1.0,
            "data": {"queue": "default", "handler": "echo", "args": {}, "priority": 0,
                     "max_attempts": 3}}
    old = decode_event("jf.job.j1.submitted", orjson.dumps(body), 1)
    assert old.v == SCHEMA_VERSION and old.data == body["data"]
    assert apply(JobState("j1"), old).state == "submitted"
    new = decode_event("jf.job.j1.submitted", orjson.dumps(
        {**body, "v": 2, "data": {**body["data"], "queued": True}}), 1)
    assert apply(JobState("j1"), new).state == "queued"
