"""The replay's reading half, in a process of its own.

A rebuild is bound by one core: reading a message costs ~9 µs in Python, folding it into
the views ~10 µs and writing it ~5 µs. The machine has two, so ``jetflow replay`` reads
in a child process (this module) while the parent folds and writes, and the two halves
overlap (``bench/replay.py`` measures both the floor and the whole).

The child reads ``JF_EVENTS`` with :class:`jetflow.adapters.reader.StreamReader` from a
sequence up to a bound (a sequence, and optionally a store time) and writes batches to
its stdout as frames: an 8-byte big-endian length, then a pickle of the batch's
:class:`jetflow.core.metadata.Stored` fields as plain tuples. A frame of length 0 ends the
stream; anything else (a crash; a server lost for ``give_up_s``, 30 s by default) ends it
with a non-zero exit, reported by the parent with the child's own log on stderr. The URL
comes through the environment (``JETFLOW_NATS_URL``), so credentials in it never show in a
process listing.

The frames are private to the two halves of one replay, which run the same code: pickle
is safe here because the parent only reads what its own child wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import pickle
import struct
import sys
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from jetflow.core import subjects as S
from jetflow.core.metadata import Stored

__all__ = ["Bounds", "FetchError", "fetch"]

_LENGTH = struct.Struct(">Q")
# a plain tuple of Stored's fields -> Stored, in C (``Stored._make`` checks the length in
# Python; the frames come from our own child, in Stored's order)
_as_stored: Callable[[tuple[Any, ...]], Stored] = functools.partial(tuple.__new__, Stored)
_PIPE_LIMIT = 16 * 1024 * 1024


class FetchError(RuntimeError):
    """The reading child failed (its own log is on stderr)."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """Where a replay stops: the stream head when it started, or earlier."""

    to_seq: int
    until_ns: int | None = None  # the stream's store time, in Unix nanoseconds

    def cut(self, msgs: list[Stored]) -> tuple[list[Stored], bool]:
        """The messages within bounds, and whether the end was reached."""
        until = self.until_ns
        for i, msg in enumerate(msgs):
            if msg.seq > self.to_seq or (until is not None and msg.time_ns > until):
                return msgs[:i], True
        return msgs, bool(msgs) and msgs[-1].seq >= self.to_seq


async def fetch(url: str, start_seq: int, bounds: Bounds, *, batch: int = 5000,
                give_up_s: float = 30.0) -> AsyncGenerator[list[Stored], None]:
    """Batches of ``JF_EVENTS`` from ``start_seq`` to ``bounds``, read by a child process
    that gives up (:class:`FetchError` here) when reading fails for ``give_up_s``."""
    args = [sys.executable, "-m", "jetflow.projections.fetcher", str(start_seq), str(bounds.to_seq),
            str(batch), "--give-up-s", str(give_up_s)]
    if bounds.until_ns is not None:
        args += ["--until-ns", str(bounds.until_ns)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, limit=_PIPE_LIMIT,
        env={**os.environ, "JETFLOW_NATS_URL": url})
    assert proc.stdout is not None
    ended = False  # by the end frame: a child that dies mid-frame did not end the stream
    try:
        while True:
            header = await _read(proc.stdout, _LENGTH.size)
            if not header:
                break
            size = _LENGTH.unpack(header)[0]
            if not size:
                ended = True
                break
            frame = await _read(proc.stdout, size)
            if not frame:
                break
            yield list(map(_as_stored, pickle.loads(frame)))
        code = await proc.wait()
        if code != 0 or not ended:
            raise FetchError(f"reading the stream failed (reader exit code {code}; its log "
                             "is above)")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _read(stream: asyncio.StreamReader, size: int) -> bytes:
    """``size`` bytes, or b"" if the child's output ended first."""
    try:
        return await stream.readexactly(size)
    except asyncio.IncompleteReadError:
        return b""


# -- the child ------------------------------------------------------------------------------

async def _serve(start_seq: int, bounds: Bounds, batch: int, give_up_s: float,
                 out: BinaryIO) -> None:
    from jetflow.adapters.bus import connect
    from jetflow.adapters.reader import StreamReader

    nc = await connect(os.environ.get("JETFLOW_NATS_URL"), name="jetflow-replay-reader",
                       wait_s=5.0)
    reader = StreamReader(nc, S.EVENTS_STREAM, start_seq=start_seq, batch=batch, idle_s=0.5,
                          give_up_s=give_up_s)
    try:
        async for msgs in reader.batches():
            within, done = bounds.cut(msgs)
            if within:
                _write(out, pickle.dumps(list(map(tuple, within)), protocol=5))
            if done or (not msgs and reader.caught_up):
                break
        _write(out, b"")
    finally:
        await reader.close()
        with contextlib.suppress(Exception):  # the end frame, if written, stands
            await nc.close()


def _write(out: BinaryIO, frame: bytes) -> None:
    out.write(_LENGTH.pack(len(frame)))
    out.write(frame)
    out.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jetflow.projections.fetcher",
                                description="The reading half of `jetflow replay` (internal).")
    p.add_argument("start_seq", type=int)
    p.add_argument("to_seq", type=int)
    p.add_argument("batch", type=int)
    p.add_argument("--until-ns", type=int)
    p.add_argument("--give-up-s", type=float, default=30.0)
    a = p.parse_args(argv)
    from jetflow.adapters.bus import BusError
    from jetflow.adapters.reader import StreamUnreadable
    from jetflow.adapters.runtime import run
    from jetflow.adapters.tracing import install_logging

    install_logging("warning", os.environ.get("JETFLOW_LOG_FORMAT", "text"),
                    service="jetflow-replay-reader")
    try:
        run(_serve(a.start_seq, Bounds(a.to_seq, a.until_ns), a.batch, a.give_up_s,
                   sys.stdout.buffer))
    except BrokenPipeError:  # the parent stopped reading (it was interrupted): not ours
        return 1
    except (StreamUnreadable, BusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
