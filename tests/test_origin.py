"""The origin check's pure part: who may sign what, and what a forgery looks like."""

from __future__ import annotations

from jetflow.core.codec import encode_event
from jetflow.core.events import Event
from jetflow.core.origin import (
    ED_HEADER,
    SIG_HEADER,
    Origin,
    Signer,
    sentinel_key,
    verify,
    worker_key,
)
from jetflow.core.subjects import event_subject

SECRET = bytes(range(32))


def stored(event: Event, signer: Signer | None) -> tuple[str, bytes, dict[str, str]]:
    subject = event_subject(event.kind, event.id, event.type)
    body = encode_event(event)
    return subject, body, signer.headers(subject, body) if signer else {}


def outcome(worker: str | None, type_: str = "succeeded") -> Event:
    data: dict[str, object] = {"attempt": 1, "result": {"ok": True}}
    if worker is not None:
        data["worker"] = worker
    if type_ == "timed_out":
        data = {"attempt": 1, "reason": "lease", "kind": "lease",
                **({"worker": worker} if worker else {})}
    return Event("job", "j1", type_, 1.0, data)


def refusal(origin: Origin, event: Event, signer: Signer | None) -> str | None:
    subject, body, headers = stored(event, signer)
    return origin.refusal(event, subject, body, headers.get(SIG_HEADER))


def test_a_worker_s_own_signature_passes_and_another_s_does_not() -> None:
    origin = Origin(SECRET)
    a, b = Signer(worker_key(SECRET, "a"), public=True), Signer(worker_key(SECRET, "b"))
    assert refusal(origin, outcome("a"), a) is None
    assert refusal(origin, outcome("a"), b) == "succeeded is not signed by worker a"
    assert refusal(origin, outcome("a"), None) == "succeeded of worker a is not signed"
    assert refusal(origin, outcome(None), a) == "succeeded names no worker"


def test_a_changed_body_breaks_the_signature() -> None:
    origin, a = Origin(SECRET), Signer(worker_key(SECRET, "a"), public=True)
    event = outcome("a")
    subject, body, headers = stored(event, a)
    forged = body.replace(b'"ok":true', b'"ok":false')
    assert forged != body
    assert origin.refusal(event, subject, forged, headers[SIG_HEADER]) is not None
    assert origin.refusal(event, subject.replace("j1", "j2"), body,
                          headers[SIG_HEADER]) is not None


def test_a_sentinel_timeout_needs_the_sentinel_s_key() -> None:
    origin = Origin(SECRET)
    assert refusal(origin, outcome(None, "timed_out"), Signer(sentinel_key(SECRET))) is None
    worker = Signer(worker_key(SECRET, "a"))
    assert refusal(origin, outcome(None, "timed_out"), worker) == \
        "timed_out is not signed by the sentinel"


def test_decisions_need_no_worker_signature_and_no_secret_checks_nothing() -> None:
    queued = Event("job", "j1", "queued", 1.0, {"attempt": 1})
    assert not Origin(SECRET).checks(queued)
    assert refusal(Origin(None), outcome("a"), None) is None


def test_readers_check_the_ed25519_signature_against_the_announced_key() -> None:
    a = Signer(worker_key(SECRET, "a"), public=True)
    b = Signer(worker_key(SECRET, "b"), public=True)
    assert a.public_hex and b.public_hex and a.public_hex != b.public_hex
    subject, body, headers = stored(outcome("a"), a)
    assert verify(a.public_hex, subject, body, headers[ED_HEADER])
    assert not verify(b.public_hex, subject, body, headers[ED_HEADER])
    assert not verify(a.public_hex, subject, body + b" ", headers[ED_HEADER])
    assert not verify(a.public_hex, subject, body, None)
    assert not verify(a.public_hex, subject, body, "zz")
    assert ED_HEADER not in Signer(sentinel_key(SECRET)).headers(subject, body)
