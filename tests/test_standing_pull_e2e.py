"""The sentinel reads its tail (JF_EVENTS) and its intake (JF_SUBMIT) with one standing
pull each, taking messages as they come: jobs submitted one at a time cost it no pull
request each (a request per batch, and the status ending it, were two round trips an
event on an idle system)."""

from __future__ import annotations

import asyncio
from collections import Counter

from jetflow import Client
from jetflow.adapters.bus import connect
from tests.conftest import StackFactory, url_of


async def test_one_at_a_time_jobs_do_not_cost_the_sentinel_a_pull_each(
        make_stack: StackFactory, client: Client) -> None:
    stack = await make_stack(workers=1)
    await stack.wait_for_workers(1, 0, 30)
    first = await client.submit("echo", {"warm": True})
    await client.wait(first, timeout=30)
    nc = await connect(url_of(client))
    pulls: Counter[str] = Counter()

    def on_pull(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        pulls[subject.decode().split(".")[5]] += 1  # $JS.API.CONSUMER.MSG.NEXT.<stream>

    try:
        await nc.subscribe_raw("$JS.API.CONSUMER.MSG.NEXT.>", on_pull)
        await nc.flush()
        jobs = 20
        for i in range(jobs):
            job_id = await client.submit("echo", {"i": i})
            assert (await client.wait(job_id, timeout=30)).state == "succeeded"
            await asyncio.sleep(0.02)  # an idle moment between jobs, as at 100 jobs/s
    finally:
        await nc.close()
    # each job is three events and one submission; a standing pull (a batch of 256, open
    # for a second) serves them all, and is asked again about once a second when idle
    assert pulls["JF_EVENTS"] < jobs / 2, pulls
    assert pulls["JF_SUBMIT"] < jobs / 2, pulls
