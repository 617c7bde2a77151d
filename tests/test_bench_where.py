"""bench.where's pure parts: the per-process CPU reading and the hop arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson

from bench.where import Marks, cpu_seconds
from jetflow.core.submission import derive_job_id


def test_hops_are_the_times_between_the_marks() -> None:
    marks = Marks()
    job_id = derive_job_id("m-1", "", 0)
    called = time.perf_counter()
    marks.on(b"jf.submit.default", b"_INBOX.x", b"{}", b"NATS/1.0\r\nNats-Msg-Id: m-1\r\n\r\n")
    marks.on(b"jf.job." + job_id.encode() + b".submitted", b"", b"{}", None)
    marks.on(b"jf.work.w1", b"", orjson.dumps([{"job_id": job_id}]), None)
    marks.on(b"jf.job." + job_id.encode() + b".started", b"", b"{}", None)
    marks.on(b"jf.job." + job_id.encode() + b".succeeded", b"", b"{}", None)
    # a repeated offer: the first one counts
    marks.on(b"jf.work.w2", b"", orjson.dumps([{"job_id": job_id}]), None)
    summary = marks.summary({job_id: called, "never-seen": called})
    assert summary["complete"] == 1
    hops = summary["hops"]
    assert list(hops) == ["submit called -> request", "request -> submitted",
                          "submitted -> offer", "offer -> started", "started -> succeeded"]
    total = sum(h["p50_ms"] for h in hops.values())
    assert abs(total - summary["total"]["p50_ms"]) < 1e-6
    assert all(h["p50_ms"] >= 0 for h in hops.values())


def test_cpu_seconds_finds_the_services_under_a_root() -> None:
    busy = "import time\nend = time.time() + 0.3\nwhile time.time() < end: pass\n" \
           "time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", busy, "worker"])
    try:
        deadline = time.monotonic() + 10
        while cpu_seconds(os.getpid()).get("worker", 0.0) < 0.1:
            assert time.monotonic() < deadline, cpu_seconds(os.getpid())
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert cpu_seconds(2**22 + 12345) == {}  # no such process
