"""Length-prefixed orjson frames between a worker and its child processes."""

from __future__ import annotations

import struct
from typing import IO, Any

from jetflow.core.codec import dumps, loads

__all__ = ["encode_frame", "read_frame_sync", "HEADER", "PARENT_ENV"]

HEADER = struct.Struct(">I")
PARENT_ENV = "JETFLOW_WORKER_PID"  # the worker's pid, in the environment of its children
MAX_FRAME = 64 * 1024 * 1024


def encode_frame(value: Any) -> bytes:
    body = dumps(value)
    return HEADER.pack(len(body)) + body


def read_frame_sync(stream: IO[bytes]) -> Any | None:
    """Read one frame; None at end of input."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is over the limit")
    return loads(stream.read(size))
