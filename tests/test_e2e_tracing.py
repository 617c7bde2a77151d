"""Traces across real processes: the sentinel, a worker and its plugin child export over
OTLP/HTTP to a real receiver in this process (``jetflow.adapters.collector``, decoding the protobuf
requests); the submitting side is the test process (a private SDK provider, so the global
one stays untouched) or the ``jetflow submit`` command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider

from jetflow import Client
from jetflow.adapters.collector import Collector
from jetflow.adapters.tracing import trace_id_of
from jetflow.core import subjects as S
from jetflow.up import Stack
from tests.conftest import StackFactory

pytestmark = pytest.mark.e2e

Spans = list[dict[str, Any]]
TRACE_ENV = "trace_env=examples.handlers:trace_env"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def otlp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """A receiver the service processes export to (they inherit this environment).
    Ask for it before ``make_stack``: it must outlive the stacks, which flush on exit."""
    with Collector(out=tmp_path / "spans.jsonl") as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        yield collector


async def spans_until(collector: Collector, predicate: Callable[[Spans], bool],
                      timeout_s: float = 10.0) -> Spans:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = collector.spans()
        if predicate(spans):
            return spans
        if time.monotonic() > deadline:
            names = sorted(f"{s['service']}:{s['name']}:{s['trace_id'][:8]}" for s in spans)
            raise AssertionError(f"spans never matched; got {names}")
        await asyncio.sleep(0.05)


def of_trace(spans: Spans, trace_id: str) -> Spans:
    return [s for s in spans if s["trace_id"] == trace_id]


def named(spans: Spans, name: str) -> Spans:
    return sorted((s for s in spans if s["name"] == name), key=lambda s: s["start_ns"])


def one(spans: Spans, name: str) -> dict[str, Any]:
    found = named(spans, name)
    assert len(found) == 1, f"{len(found)} spans named {name!r}"
    return found[0]


def has(names: list[str], count: int = 1) -> Callable[[Spans], bool]:
    """Every name present ``count`` times in some trace."""
    def check(spans: Spans) -> bool:
        for tid in {s["trace_id"] for s in spans}:
            mine = [s["name"] for s in spans if s["trace_id"] == tid]
            if all(mine.count(n) >= count for n in names):
                return True
        return False
    return check


JOB_SPANS = ["process jf.submit.default", "dispatch default"]


async def test_one_trace_from_the_callers_span_to_the_plugins_own_work(
        otlp: Collector, make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1, handlers=f"echo,{TRACE_ENV}")
    caller_tracer = TracerProvider().get_tracer("test-app")  # private: no global provider
    with caller_tracer.start_as_current_span("checkout") as caller:
        job_id = await client.submit("trace_env", {"items": 3}, correlation_id="order-42")
    job = await client.wait(job_id, timeout=20)
    assert job.state == "succeeded", job
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    expected = [*JOB_SPANS, "attempt trace_env", "run trace_env", "plugin work"]
    spans = of_trace(await spans_until(otlp, has(expected)), trace_id)

    services = {s["name"]: s["service"] for s in spans}
    assert services["process jf.submit.default"] == "jetflow-sentinel"
    assert services["attempt trace_env"] == "jetflow-worker"
    assert services["run trace_env"] == services["plugin work"] == "jetflow-plugin"

    # submit (the caller) -> sentinel -> dispatch -> attempt -> child -> plugin's own span
    by_id = {s["span_id"]: s for s in spans}
    process = one(spans, "process jf.submit.default")
    assert process["parent_span_id"] == f"{caller.get_span_context().span_id:016x}"
    dispatch, attempt = one(spans, "dispatch default"), one(spans, "attempt trace_env")
    run, work = one(spans, "run trace_env"), one(spans, "plugin work")
    assert by_id[dispatch["parent_span_id"]] is process
    assert [e["name"] for e in dispatch["events"]] == ["queued"]
    assert by_id[attempt["parent_span_id"]] is dispatch
    events = {e["name"]: e["attributes"] for e in attempt["events"]}  # the two appends
    assert events["claimed"]["jetflow.seq"] > 0
    assert events["recorded"]["jetflow.outcome"] == "succeeded"
    assert by_id[run["parent_span_id"]] is attempt
    assert by_id[work["parent_span_id"]] is run
    assert attempt["start_ns"] <= run["start_ns"] <= run["end_ns"] <= attempt["end_ns"]

    # messaging conventions and jetflow attributes
    a = attempt["attributes"]
    assert attempt["kind"] == "consumer"
    assert a["messaging.system"] == "nats"
    assert a["messaging.operation"] == "process"
    assert a["messaging.destination.name"].startswith("jf.work.")
    assert a["messaging.message.id"].startswith(f"work:{job_id}:1:")
    assert a["jetflow.worker_id"] == a["messaging.destination.name"].removeprefix("jf.work.")
    assert (a["jetflow.job_id"], a["jetflow.handler"], a["jetflow.queue"],
            a["jetflow.attempt"], a["jetflow.outcome"],
            a["jetflow.correlation_id"]) == (job_id, "trace_env", "default", 1, "succeeded",
                                             "order-42")
    p = process["attributes"]
    assert (p["messaging.system"], p["messaging.operation"],
            p["messaging.destination.name"]) == ("nats", "process", "jf.submit.default")
    assert (p["jetflow.job_id"], p["jetflow.outcome"]) == (job_id, "submitted")
    assert dispatch["attributes"]["jetflow.queue_wait_ms"] >= 0

    # the plugin saw its own span's context and the stable correlation id
    assert job.result["correlation_id"] == job.result["ctx_correlation_id"] == "order-42"
    assert job.result["traceparent"].split("-")[1:3] == [trace_id, run["span_id"]]

    # every event carries the trace and the same correlation id (projections read them)
    history = await client.history_with_headers(job_id)
    assert [e.type for e, _h in history] == ["submitted", "started", "succeeded"]
    assert {trace_id_of(h.get(S.HDR_TRACEPARENT)) for _e, h in history} == {trace_id}
    assert {h.get(S.HDR_CORRELATION_ID) for _e, h in history} == {"order-42"}


async def test_each_attempt_of_a_retried_job_is_its_own_span(
        otlp: Collector, make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1, sentinel_args=["--retry", "0.2,2,1"])
    job_id = await client.submit("fail", {"message": "disk full"}, max_attempts=2)
    job = await client.wait(job_id, timeout=20)
    assert job.state == "dead_lettered", job
    twice = ["attempt fail", "run fail", "dispatch default"]
    await spans_until(otlp, has(twice, 2))
    spans = await spans_until(otlp, has(["decide retry_scheduled", "decide dead_lettered"]))
    trace_id = next(s["trace_id"] for s in spans if s["name"] == "attempt fail")
    spans = of_trace(spans, trace_id)
    attempts, runs = named(spans, "attempt fail"), named(spans, "run fail")
    dispatches = named(spans, "dispatch default")
    assert [s["attributes"]["jetflow.attempt"] for s in attempts] == [1, 2]
    assert len({s["span_id"] for s in attempts}) == 2
    assert [s["parent_span_id"] for s in attempts] == [d["span_id"] for d in dispatches]
    assert [r["parent_span_id"] for r in runs] == [a["span_id"] for a in attempts]
    for span in (*attempts, *runs):
        assert span["status"]["code"] == "error"
        assert "RuntimeError: disk full" in span["status"]["message"]
        exception = next(e for e in span["events"] if e["name"] == "exception")
        assert exception["attributes"]["exception.type"] == "RuntimeError"
        assert exception["attributes"]["exception.message"] == "disk full"
        assert "Traceback" in exception["attributes"]["exception.stacktrace"]
    assert [a["attributes"]["jetflow.outcome"] for a in attempts] == ["failed", "failed"]
    decided = [s["attributes"]["jetflow.decision"] for s in
               sorted((s for s in spans if s["name"].startswith("decide ")),
                      key=lambda s: s["start_ns"])]
    assert decided == ["retry_scheduled", "dead_lettered"]  # "queued" starts each dispatch
    retry = one(spans, "decide retry_scheduled")
    assert retry["attributes"]["jetflow.attempt"] == 2
    assert retry["attributes"]["jetflow.retry_delay_s"] > 0
    assert retry["parent_span_id"] == one(spans, "process jf.submit.default")["span_id"]
    assert retry["start_ns"] < dispatches[1]["start_ns"]  # backoff, then queued again


async def test_a_raw_publish_with_a_traceparent_continues_that_trace(
        otlp: Collector, make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1)
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    await client.nc.publish(S.submit_subject("default"),
                            orjson.dumps({"handler": "echo", "job_id": "raw-traced"}),
                            headers={"traceparent": f"00-{trace_id}-{span_id}-01",
                                     "tracestate": "shop=7",
                                     S.HDR_CORRELATION_ID: "from-the-shell"})
    assert (await client.wait("raw-traced", timeout=20)).state == "succeeded"
    spans = await spans_until(otlp, has([*JOB_SPANS, "attempt echo", "run echo"]))
    spans = of_trace(spans, trace_id)
    assert one(spans, "process jf.submit.default")["parent_span_id"] == span_id
    assert {s["name"] for s in spans} >= {*JOB_SPANS, "attempt echo", "run echo"}
    history = await client.history_with_headers("raw-traced")
    assert {trace_id_of(h["traceparent"]) for _e, h in history} == {trace_id}
    assert {h["tracestate"] for _e, h in history} == {"shop=7"}
    assert {h[S.HDR_CORRELATION_ID] for _e, h in history} == {"from-the-shell"}


@pytest.mark.parametrize("traceparent", [None, "00-not-a-trace-01",
                                         "00-00000000000000000000000000000000-"
                                         "00f067aa0ba902b7-01"])
async def test_missing_or_malformed_traceparent_starts_a_new_trace(
        otlp: Collector, make_stack: StackFactory, client: Client,
        traceparent: str | None) -> None:
    await make_stack(workers=1)
    headers = {} if traceparent is None else {"traceparent": traceparent}
    await client.nc.publish(S.submit_subject("default"),
                            orjson.dumps({"handler": "echo", "job_id": "untraced"}),
                            headers=headers)
    assert (await client.wait("untraced", timeout=20)).state == "succeeded"
    spans = await spans_until(otlp, has([*JOB_SPANS, "attempt echo", "run echo"]))
    process = one(spans, "process jf.submit.default")
    assert process["parent_span_id"] is None  # a new trace starts here
    trace_id = process["trace_id"]
    assert len({s["trace_id"] for s in spans}) == 1
    assert {s["name"] for s in spans} >= {*JOB_SPANS, "attempt echo", "run echo"}
    history = await client.history_with_headers("untraced")
    assert {trace_id_of(h.get("traceparent")) for _e, h in history} == {trace_id}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jetflow.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=dict(os.environ))


async def test_cli_submit_starts_the_trace_and_jetflow_trace_shows_it(
        otlp: Collector, make_stack: StackFactory, tmp_path: Path) -> None:
    stack: Stack = await make_stack(workers=1, worker_args=["--log-format", "json",
                                                            "--log-level", "DEBUG"])
    done = await asyncio.to_thread(_cli, "submit", "echo", "--args", '{"x": 1}', "--wait",
                                   "--json", "--nats", stack.url)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    spans = await spans_until(otlp, has([*JOB_SPANS, "publish jf.submit.default",
                                         "attempt echo", "run echo"]))
    submit = one(spans, "publish jf.submit.default")
    assert (submit["service"], submit["kind"], submit["parent_span_id"]) == \
        ("jetflow-submit", "producer", None)
    assert submit["attributes"]["jetflow.job_id"] == job_id
    trace_id = submit["trace_id"]
    spans = of_trace(spans, trace_id)
    assert one(spans, "process jf.submit.default")["parent_span_id"] == submit["span_id"]

    shown = await asyncio.to_thread(_cli, "trace", job_id, "--nats", stack.url,
                                    "--spans", str(otlp.out))
    assert shown.returncode == 0, shown.stderr
    assert f"trace {trace_id}  (submitted, started, succeeded)" in shown.stdout
    assert f"http://localhost:16686/trace/{trace_id}" in shown.stdout
    tree = shown.stdout.splitlines()
    order = [next(i for i, line in enumerate(tree) if f"└─ {name}  " in line)
             for name in ("publish jf.submit.default", "process jf.submit.default",
                          "dispatch default", "attempt echo", "run echo")]
    assert order == sorted(order)
    indent = [tree[i].index("└─") for i in order]
    assert indent == sorted(indent) and len(set(indent)) == len(indent)

    as_json = json.loads((await asyncio.to_thread(
        _cli, "trace", job_id, "--json", "--nats", stack.url, "--data", str(tmp_path),
        "--jaeger", "http://jaeger:16686")).stdout)
    assert as_json["correlation_id"] == job_id
    assert [t["trace_id"] for t in as_json["traces"]] == [trace_id]
    assert as_json["traces"][0]["jaeger_url"] == f"http://jaeger:16686/trace/{trace_id}"

    # the worker's JSON log lines about the job carry its correlation id and trace id
    lines = [json.loads(line) for line in (stack.log_dir / "worker-1.log").read_text()
             .splitlines() if line.startswith("{")]
    recorded = [x for x in lines if x["message"].endswith("succeeded recorded")]
    assert recorded, lines
    assert (recorded[0]["correlation_id"], recorded[0]["trace_id"]) == (job_id, trace_id)
    assert {x["service"] for x in lines} == {"jetflow-worker"}


async def test_tracing_off_still_carries_the_callers_context(
        make_stack: StackFactory, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """No exporter configured: no spans are made, and the submitter's trace context and
    correlation id still travel on every event and into the plugin's environment."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    await make_stack(workers=1, handlers=TRACE_ENV)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    job_id = await client.submit("trace_env", headers={"traceparent": traceparent},
                                 correlation_id="c-off")
    job = await client.wait(job_id, timeout=20)
    assert job.state == "succeeded"
    assert job.result == {"traceparent": traceparent, "correlation_id": "c-off",
                          "ctx_correlation_id": "c-off"}
    history = await client.history_with_headers(job_id)
    assert {h.get("traceparent") for _e, h in history} == {traceparent}
