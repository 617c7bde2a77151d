"""Workflows stay exact while sentinels die: kill -9 the sentinel (and run two) during a
run of workflows; every step runs to success exactly once and every workflow ends right."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

from jetflow import Client
from tests.conftest import StackFactory, read_log, url_of

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "workflows"
CASES = [("linear", {"even_number": 6}, 69), ("diamond", {"even_number": 4}, 4**16),
         ("tree", {"even_number": 2}, 2**64), ("mixed_dag", {"even_number": 6}, 6**64)]


async def test_kill9_sentinels_during_workflows(make_stack: StackFactory,
                                                client: Client) -> None:
    rng = random.Random()
    stack = await make_stack(workers=2, concurrency=4)
    await stack.add_sentinel()  # two at once, as well
    for name, _, _ in CASES:
        await client.register_workflow(EXAMPLES / f"{name}.yaml")
    started: dict[str, int] = {}

    async def start_all() -> None:
        for i in range(40):
            name, context, expected = CASES[i % len(CASES)]
            wf = await client.start_workflow(name, context, workflow_id=f"kf-{i}",
                                             reply_timeout_s=60)
            started[wf] = expected
            await asyncio.sleep(rng.uniform(0, 0.05))

    starter = asyncio.create_task(start_all())
    for _ in range(6):
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        await stack.sentinels[-1].kill()
        await stack.add_sentinel()
    await starter
    views = await asyncio.gather(*(client.wait_workflow(w, timeout=120) for w in started))
    for view in views:
        assert view.state == "succeeded", (view.workflow_id, view.reason)
        assert view.result == started[view.workflow_id], view.workflow_id
        assert all(s.attempts == 1 for s in view.steps.values()), view.workflow_id
    log = await read_log(url_of(client))
    steps = {s.job_id for v in views for s in v.steps.values()}
    per_type = Counter((e.id, e.type) for e in log if e.id in steps)
    for job_id in steps:
        assert per_type[(job_id, "submitted")] == 1, job_id
        assert per_type[(job_id, "started")] == 1, job_id
        assert per_type[(job_id, "succeeded")] == 1, job_id
    ends = Counter(e.id for e in log if e.kind == "wf" and e.type == "succeeded")
    assert all(ends[w] == 1 for w in started)
    assert sum(1 for e in log if e.kind == "wf" and e.type == "started") == len(started)
