"""Who wrote a job event, where nats-server cannot tell: the origin check (pure).

Subject permissions let any worker append a worker's events (``started``, ``progress``,
``succeeded``, ``failed``, ``timed_out``, ``handed_back``) on any job: the job id is in
the subject, the worker holding its claim is not. So a worker signs what it appends: an
HMAC-SHA256 of the subject and the body, with its own key, in the ``Jf-Sig`` header. A
worker's key is derived from one origin secret and its worker id
(:func:`worker_key`): the sentinel and the projector, which hold the secret, can check any
worker's events; a worker, which holds only its own key, cannot sign as another. A
``timed_out`` that names no worker is the sentinel's decision, signed with the sentinel's
key. The job state machine then refuses an outcome from a worker that does not hold the
current claim (:mod:`jetflow.core.job`), so an event that passes here counts only when it
comes from the claim's holder.

A reader holds no secret, so a worker also signs with an Ed25519 key (its signing key as
the seed), in ``Jf-Sig-Ed25519``, and announces the public half in its ``joined`` event
(``key``), which only that worker may append: a reader (``client.status``, ``client.wait``)
checks a worker's events against the key its ``joined`` announced. (A ``timed_out`` of
the sentinel, signed by HMAC only, is not checked by readers.)

Without an origin secret (``jetflow up --insecure``), nothing is checked.
"""

from __future__ import annotations

import hashlib
import hmac

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from jetflow.core.events import Event

__all__ = ["SIG_HEADER", "ED_HEADER", "WORKER_SIGNED", "Origin", "Signer", "needs_signature",
           "sign", "verify", "worker_key", "sentinel_key"]

SIG_HEADER = "Jf-Sig"
ED_HEADER = "Jf-Sig-Ed25519"
# the job events a worker may append (its permissions), each signed by its author
WORKER_SIGNED = frozenset({"started", "progress", "succeeded", "failed", "timed_out",
                           "handed_back"})


def needs_signature(event: Event) -> bool:
    """Whether ``event`` is one whose author is checked: a worker's kind of job event (the
    rest are told apart by their subjects, which the server's permissions guard)."""
    return event.kind == "job" and event.type in WORKER_SIGNED


def worker_key(secret: bytes, worker_id: str) -> bytes:
    """Worker ``worker_id``'s signing key."""
    return hmac.new(secret, b"worker\0" + worker_id.encode(), hashlib.sha256).digest()


def sentinel_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"sentinel\0", hashlib.sha256).digest()


def sign(key: bytes, subject: str, body: bytes) -> str:
    """The ``Jf-Sig`` value of ``body`` appended on ``subject``."""
    return hmac.digest(key, _signed(subject, body), "sha256").hex()  # (the C fast path)


def _signed(subject: str, body: bytes) -> bytes:
    return subject.encode() + b"\0" + body


def verify(public_hex: str, subject: str, body: bytes, given: str | None) -> bool:
    """Whether ``given`` (a ``Jf-Sig-Ed25519`` value) signs ``body`` on ``subject`` with the
    Ed25519 key ``public_hex``."""
    if not given:
        return False
    try:
        VerifyKey(bytes.fromhex(public_hex)).verify(_signed(subject, body), bytes.fromhex(given))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


class Signer:
    """Signs what one actor appends: HMAC with ``key`` (checked by the services), and for a
    worker (``public``) Ed25519 with ``key`` as the seed (checked by readers)."""

    def __init__(self, key: bytes, *, public: bool = False) -> None:
        self.key = key
        self._ed = SigningKey(key) if public else None

    @property
    def public_hex(self) -> str | None:
        """The Ed25519 public key a worker announces in its ``joined`` event."""
        return self._ed.verify_key.encode().hex() if self._ed is not None else None

    def headers(self, subject: str, body: bytes) -> dict[str, str]:
        out = {SIG_HEADER: sign(self.key, subject, body)}
        if self._ed is not None:
            out[ED_HEADER] = self._ed.sign(_signed(subject, body)).signature.hex()
        return out


class Origin:
    """Checks the signatures of the events workers may append (nothing without a secret)."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self._keys: dict[str, bytes] = {}
        self._sentinel = sentinel_key(secret) if secret else b""

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def checks(self, event: Event) -> bool:
        """Whether ``event`` is checked (a secret, and it needs a signature)."""
        return self.secret is not None and needs_signature(event)

    def refusal(self, event: Event, subject: str, body: bytes,
                given: str | None) -> str | None:
        """Why ``event`` (stored as ``body`` on ``subject``, its ``Jf-Sig`` header
        ``given``) was not written by whom it names, or None when it was (or needs no
        signature, or nothing is checked)."""
        if not self.checks(event):
            return None
        worker = event.data.get("worker")
        if event.type == "timed_out" and worker is None:
            key, author = self._sentinel, "the sentinel"
        elif isinstance(worker, str) and worker:
            key, author = self._key(worker), f"worker {worker}"
        else:
            return f"{event.type} names no worker"
        if not given:
            return f"{event.type} of {author} is not signed"
        if not hmac.compare_digest(given, sign(key, subject, body)):
            return f"{event.type} is not signed by {author}"
        return None

    def _key(self, worker_id: str) -> bytes:
        key = self._keys.get(worker_id)
        if key is None:
            assert self.secret is not None
            if len(self._keys) > 10_000:
                self._keys.clear()
            key = self._keys[worker_id] = worker_key(self.secret, worker_id)
        return key
