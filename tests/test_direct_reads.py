"""Reading the log by batched direct gets: every message on the filters, in stream order,
across batches, and no consumer left behind (a submitter may read this way)."""

from __future__ import annotations

from pathlib import Path

from jetflow.adapters import bus
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S


async def test_a_scan_spans_batches_and_merges_filters_in_order(tmp_path: Path) -> None:
    async with EmbeddedServer(tmp_path, port=0) as srv:
        nc = await bus.connect(srv.url)
        try:
            js = nc.jetstream()
            await bus.ensure_streams(js)
            for i in range(3 * bus.DIRECT_BATCH):
                await js.publish("jf.job.x.progress", b"{}")
                if i % 3 == 0:
                    await js.publish("jf.job.y.progress", b"{}")
            xs = await bus.messages_on(js, ["jf.job.x.*"])
            assert len(xs) == 3 * bus.DIRECT_BATCH
            assert {m.subject for m in xs} == {"jf.job.x.progress"}
            both = await bus.messages_on(js, ["jf.job.x.*", "jf.job.y.*"], start_seq=100)
            seqs = [bus.stored_seq(m) for m in both]
            assert seqs == list(range(100, 4 * bus.DIRECT_BATCH + 1))
            assert await bus.messages_on(js, ["jf.job.none.*"]) == []
            assert await js.consumers_info(S.EVENTS_STREAM) == []
        finally:
            await nc.close()
