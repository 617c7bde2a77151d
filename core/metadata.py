"""Parse the metadata JetStream puts in a delivered message's reply subject. Pure.

``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens) or the
newer ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.
<pending>[.<token>]`` (11 or 12 tokens). Reading it by hand is much cheaper than building
nats-py's Metadata object for every event of a replay.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Delivery", "parse_ack_reply"]


@dataclass(frozen=True, slots=True)
class Delivery:
    stream: str
    stream_seq: int
    timestamp_ns: int
    pending: int


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
