"""The sentinel is stateless: kill -9 it mid-run, restart it, and every job still
finishes exactly once. Also: clear errors when the server cannot host jetflow."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from jetflow import Client
from jetflow.adapters.bus import BusError, connect, ensure_streams
from jetflow.adapters.nats_server import find_binary
from tests.conftest import StackFactory, read_log, url_of
from tests.test_e2e_dispatch import assert_exactly_once


async def test_sentinel_kill9_mid_run_loses_and_duplicates_nothing(
        make_stack: StackFactory, client: Client) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stack = await make_stack(workers=2, concurrency=4)
    await client.watch()
    ids: list[str] = []
    kills = 0

    async def submit_all() -> None:
        for _ in range(300):
            ids.append(await client.submit("sleep", {"seconds": rng.choice([0, 0.01, 0.05])},
                                           reply_timeout_s=60))

    submitter = asyncio.create_task(submit_all())
    for _ in range(3):
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        await stack.sentinels[0].kill()
        kills += 1
        stack.sentinels.clear()
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        await stack.add_sentinel()
    await submitter
    finals = await client.wait_terminal(set(ids), timeout=120)
    outcome = {e.type for e in finals.values()}
    assert outcome == {"succeeded"}, f"seed {seed}: {outcome}"
    assert kills == 3
    assert_exactly_once(await read_log(url_of(client)), ids)


async def test_clashing_stream_is_a_clear_error(server) -> None:  # type: ignore[no-untyped-def]
    nc = await connect(server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="JF_EVENTS", subjects=["something.else.>"]))
    with pytest.raises(BusError, match="JF_EVENTS exists with subjects"):
        await ensure_streams(js)
    await nc.close()


async def test_server_without_jetstream_is_a_clear_error(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        find_binary(), "-a", "127.0.0.1", "-p", "-1", "-l", str(tmp_path / "log"))
    try:
        port = await _port_from_log(tmp_path / "log")
        nc = await connect(f"nats://127.0.0.1:{port}")
        with pytest.raises(BusError, match="JetStream is not enabled"):
            await ensure_streams(nc.jetstream())
        await nc.close()
    finally:
        proc.kill()
        await proc.wait()


async def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(BusError, match="cannot reach NATS"):
        await connect("nats://127.0.0.1:1", wait_s=0.5)


async def _port_from_log(path: Path) -> int:
    for _ in range(100):
        text = path.read_text() if path.exists() else ""
        if "Server is ready" in text:
            marker = "Listening for client connections on "
            return int(text.split(marker, 1)[1].split()[0].rsplit(":", 1)[1])
        await asyncio.sleep(0.05)
    raise AssertionError("plain nats-server did not start")
