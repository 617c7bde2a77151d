"""Fixtures: a real nats-server (the venv's binary) on a free port with its own store,
and the whole system as real processes. No mocks of NATS anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from jetflow import Client
from jetflow import connect as client_connect
from jetflow.adapters.bus import connect, ensure_streams, messages_on, stored_seq
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S
from jetflow.core.codec import decode_event
from jetflow.core.events import Event
from jetflow.up import Stack


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    async with EmbeddedServer(tmp_path / "srv", port=0) as srv:
        yield srv


@pytest.fixture
async def client(server: EmbeddedServer) -> AsyncIterator[Client]:
    c = await client_connect(server.url)
    await ensure_streams(c.js)
    yield c
    await c.close()


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(server: EmbeddedServer, tmp_path: Path) -> AsyncIterator[StackFactory]:
    """Start service processes against the fixture's server; all are stopped at the end."""
    stacks: list[Stack] = []

    async def start(**kwargs: Any) -> Stack:
        kwargs.setdefault("projector", False)
        kwargs.setdefault("lease_s", 3.0)
        stack = Stack(data_dir=tmp_path / f"stack{len(stacks)}", nats_url=server.url,
                      **kwargs)
        stacks.append(stack)
        await stack.start()
        return stack

    yield start
    for stack in stacks:
        await stack.stop()
        _dump_logs_on_failure(stack)


def _dump_logs_on_failure(stack: Stack) -> None:
    for log in sorted(stack.log_dir.glob("*.log")) if stack.log_dir.exists() else []:
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"----- {log.name} -----\n{text[-4000:]}")


async def read_log(url: str, subjects: list[str] | None = None) -> list[Event]:
    """Every decodable event in JF_EVENTS (optionally filtered), in stream order, by direct
    gets (no consumer: an anonymous submitter of a secured stack may read so)."""
    nc = await connect(url)
    try:
        msgs = await messages_on(nc.jetstream(), subjects or [f"{S.PREFIX}.>"])
    finally:
        await nc.close()
    events: list[Event] = []
    for m in msgs:
        with contextlib.suppress(ValueError):  # forged events are not history
            events.append(decode_event(m.subject, m.data, stored_seq(m)))
    return events


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float,
                     what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def url_of(client: Client) -> str:
    server = client.nc.connected_url
    assert server is not None
    return f"nats://{server.hostname}:{server.port}"
