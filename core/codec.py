"""Encoding and decoding of events (orjson), with size limits, validation and upcasting.

Anything read from the log may have been published by hand, so :func:`decode_event`
trusts nothing: the subject, the envelope and the type's fields must agree, or it raises
:class:`CodecError` whose ``code`` is machine-readable and whose message is recorded
verbatim by whoever rejects the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from jetflow.core.events import FIELDS, SCHEMA_VERSION, Event, stored_event
from jetflow.core.subjects import parse_event_subject

__all__ = ["CodecError", "Unreadable", "encode_event", "decode_event", "MAX_EVENT_BYTES",
           "dumps", "loads"]

MAX_EVENT_BYTES = 1024 * 1024

# (kind, type, from_version) -> function turning data of that version into the next one.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, str, int], Upcaster] = {}


class Unreadable(NamedTuple):
    """A stored message that is not a valid event, and why (:class:`CodecError`)."""

    seq: int
    subject: str
    code: str
    reason: str


class CodecError(ValueError):
    """A message that is not a valid event or submission; ``code`` names the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Integers beyond 64 bits (a workflow's n^64 reaches them) are kept exactly: JSON numbers
# that orjson cannot write are written as {"$bigint": "<decimal digits>"} and read back as
# Python ints, wherever jetflow encodes (events, offers, frames to and from a handler,
# replies). The key "$bigint" is therefore reserved in job arguments and results.
BIGINT_KEY = "$bigint"
_BIGINT_MARK = b'"$bigint"'
_I64 = (-(2**63), 2**64 - 1)  # what orjson writes as a number (u64 included)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
        return orjson.dumps(_tag_bigints(value))


def loads(raw: bytes | str) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CodecError("invalid_json", f"body is not valid JSON: {exc}") from None
    tagged = _BIGINT_MARK in raw if isinstance(raw, bytes) else BIGINT_KEY in raw
    if not tagged:
        return value
    try:
        return revive_bigints(value)
    except RecursionError:  # orjson reads 1,024 levels, Python recurses ~1,000
        raise CodecError("too_deep", "body is nested too deep to read") from None


def _tag_bigints(value: Any) -> Any:
    if type(value) is int and not _I64[0] <= value <= _I64[1]:
        return {BIGINT_KEY: str(value)}
    if isinstance(value, dict):
        return {k: _tag_bigints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag_bigints(v) for v in value]
    return value


def revive_bigints(value: Any) -> Any:
    """``value`` with every ``{"$bigint": "..."}`` turned back into its int."""
    if isinstance(value, dict):
        if len(value) == 1 and BIGINT_KEY in value and isinstance(value[BIGINT_KEY], str):
            try:
                return int(value[BIGINT_KEY])
            except ValueError:
                return value
        return {k: revive_bigints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [revive_bigints(v) for v in value]
    return value


def encode_event(event: Event) -> bytes:
    body = {
        "type": event.type,
        f"{event.kind}_id": event.id,
        "v": event.v,
        "at": event.at,
        "data": event.data,
    }
    raw = dumps(body)
    if len(raw) > MAX_EVENT_BYTES:
        raise CodecError("too_large", f"event is {len(raw)} bytes, over {MAX_EVENT_BYTES}")
    return raw


def decode_event(subject: str, raw: bytes, seq: int = 0) -> Event:
    """Decode and validate one stored event; the subject must agree with the envelope.
    (The projector and the replay call this for every event of the log: keep it lean.)"""
    where = parse_event_subject(subject)
    if where is None:
        raise CodecError("bad_subject", f"subject {subject!r} is not jf.<kind>.<id>.<type>")
    kind, id_, type_ = where
    if len(raw) > MAX_EVENT_BYTES:
        raise CodecError("too_large", f"event is {len(raw)} bytes, over {MAX_EVENT_BYTES}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CodecError("invalid_json", f"body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise CodecError("not_object", "event body is not a JSON object")
    _check_envelope(body, kind, id_, type_)
    data, v = body["data"], body["v"]
    if _BIGINT_MARK in raw:
        data = revive_bigints(data)
    if v != SCHEMA_VERSION:
        data = _upcast(kind, type_, v, data)
    _check_fields(kind, type_, data)
    return stored_event(kind, id_, type_, float(body["at"]), data, SCHEMA_VERSION, seq)


def _check_envelope(body: dict[str, Any], kind: str, id_: str, type_: str) -> None:
    """One test for a well-formed envelope (every stored event passes here); the reason
    for a bad one is found by :func:`_explain_envelope`."""
    try:
        v, at = body["v"], body["at"]
        if (body["type"] == type_ and body[_ID_KEY[kind]] == id_ and type(v) is int
                and 1 <= v <= SCHEMA_VERSION and type(at) in _NUMBER and at >= 0
                and type(body["data"]) is dict and type_ in FIELDS[kind]):
            return
    except KeyError:
        pass
    _explain_envelope(body, kind, id_, type_)


def _explain_envelope(body: dict[str, Any], kind: str, id_: str, type_: str) -> None:
    if type_ not in FIELDS[kind]:
        raise CodecError("unknown_type", f"unknown {kind} event type {type_!r}")
    if body.get("type") != type_:
        raise CodecError("mismatch", f"envelope type {body.get('type')!r} != subject {type_!r}")
    if body.get(_ID_KEY[kind]) != id_:
        raise CodecError("mismatch", f"envelope {kind}_id does not match subject id {id_!r}")
    v = body.get("v")
    if type(v) is not int or not 1 <= v <= SCHEMA_VERSION:
        raise CodecError("bad_version", f"unsupported event version {v!r}")
    at = body.get("at")
    if not isinstance(at, _NUMBER) or isinstance(at, bool) or at < 0:
        raise CodecError("bad_time", f"'at' must be a non-negative number, got {at!r}")
    raise CodecError("bad_data", "'data' must be a JSON object")


_ID_KEY = {kind: f"{kind}_id" for kind in FIELDS}
_NUMBER = (int, float)  # JSON numbers as orjson gives them (a bool is neither)


def _upcast(kind: str, type_: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    """An older event's data as today's version reads it; a version step no upcaster is
    registered for left the event's data as it was (v1 -> v2 only added an optional
    field)."""
    while version < SCHEMA_VERSION:
        upcast = UPCASTERS.get((kind, type_, version))
        if upcast is not None:
            data = upcast(data)
        version += 1
    return data


def _check_fields(kind: str, type_: str, data: dict[str, Any]) -> None:
    for name, types in FIELDS[kind][type_].items():
        if type(data.get(name)) not in types:  # None (missing) is no accepted type
            wanted = "/".join(t.__name__ for t in types)
            raise CodecError("bad_field", f"{type_}: field {name!r} must be {wanted}")
