"""Parse what JetStream puts in a delivered message: the metadata in its reply subject and
its header block. Pure.

``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens) or the
newer ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
<pending>[.<token>]`` (11 or 12 tokens). Reading it by hand is much cheaper than building
nats-py's Metadata object for every event of a replay.

A header block is what NATS sends before a payload: ``NATS/1.0\\r\\n`` (or
``NATS/1.0 404 No Messages\\r\\n`` for a status) then one ``Name: value\\r\\n`` per header
and an empty line. The replay reads the one or two headers it needs straight from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Delivery", "Stored", "parse_ack_reply", "ack_numbers", "header_value",
           "header_block", "status_of"]

_STATUS_LINE = b"NATS/1.0"


@dataclass(frozen=True, slots=True)
class Delivery:
    stream: str
    stream_seq: int
    timestamp_ns: int
    pending: int


class Stored(NamedTuple):
    """One message as the stream stored it (what the projector and the replay read)."""

    seq: int
    subject: str
    data: bytes
    headers: bytes | None = None  # the header block as stored, unparsed
    time_ns: int = 0  # when the server stored it, Unix nanoseconds

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


def parse_ack_reply(reply: str) -> Delivery:
    """Return the delivery metadata; raise ValueError for a subject of another shape."""
    tokens = reply.split(".")
    if not (len(tokens) == 9 or len(tokens) >= 11) or tokens[:2] != ["$JS", "ACK"]:
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    base = 2 if len(tokens) == 9 else 4
    return Delivery(
        stream=tokens[base],
        stream_seq=int(tokens[base + 3]),
        timestamp_ns=int(tokens[base + 5]),
        pending=int(tokens[base + 6]),
    )


def ack_numbers(reply: bytes) -> tuple[int, int, int, int]:
    """(stream sequence, consumer sequence, timestamp ns, pending) of an ack subject in
    bytes, as the wire has it; ValueError for a subject of another shape."""
    tokens = reply.split(b".")
    n = len(tokens)
    if not (n == 9 or n >= 11) or tokens[0] != b"$JS" or tokens[1] != b"ACK":
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    base = 5 if n == 9 else 7
    return (int(tokens[base]), int(tokens[base + 1]), int(tokens[base + 2]),
            int(tokens[base + 3]))


def header_value(block: bytes | None, name: str) -> str | None:
    """The value of header ``name`` in a header block (the first, if repeated), or None."""
    if not block:
        return None
    want = name.encode()
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip() == want:
            return value.strip().decode("utf-8", "replace")
    return None


def headers_of(block: bytes | None) -> dict[str, str]:
    """Every header of a header block (the first value of a repeated one)."""
    found: dict[str, str] = {}
    if not block:
        return found
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep:
            found.setdefault(key.strip().decode("utf-8", "replace"),
                             value.strip().decode("utf-8", "replace"))
    return found


def status_of(block: bytes | None) -> tuple[str, str] | None:
    """(code, description) of a status message (``NATS/1.0 408 Request Timeout``), or None
    for an ordinary header block."""
    if not block or not block.startswith(_STATUS_LINE + b" "):
        return None
    line = block[len(_STATUS_LINE) + 1:].split(b"\r\n", 1)[0].decode("utf-8", "replace")
    code, _, description = line.partition(" ")
    return code, description.strip()


def header_block(headers: dict[str, str]) -> bytes:
    """The header block NATS would carry for ``headers`` (for tests and tools)."""
    lines = [_STATUS_LINE] + [f"{k}: {v}".encode() for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"
