"""Tracing without a broker: W3C parsing and propagation over header dicts, exporter
selection from the environment, log context and formats, the span tree, and the OTLP/HTTP
receiver fed by the real OTLP exporter (a private SDK provider: the global one is never
touched in the test process)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from jetflow.adapters import tracing
from jetflow.adapters.collector import Collector
from jetflow.cli.trace import span_tree
from jetflow.core import subjects as S

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
GOOD = f"00-{TID}-{SID}-01"


@pytest.mark.parametrize(("value", "expected"), [
    (GOOD, TID),
    (f"  {GOOD}\t", TID),
    (f"01-{TID}-{SID}-01-future-fields", TID),  # a later version may add fields
    (f"00-{TID}-{SID}-01-extra", None),  # version 00 may not
    (f"ff-{TID}-{SID}-01", None),
    (f"00-{'0' * 32}-{SID}-01", None),
    (f"00-{TID}-{'0' * 16}-01", None),
    (f"00-{TID.upper()}-{SID}-01", None),  # W3C: lowercase hex only
    (f"00-{TID[:-1]}-{SID}-01", None),
    ("garbage", None),
    ("", None),
    (None, None),
])
def test_trace_id_of(value: str | None, expected: str | None) -> None:
    assert tracing.trace_id_of(value) == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, []),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, []),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
])
def test_wanted_exporters(env: dict[str, str], expected: list[str]) -> None:
    assert tracing.wanted_exporters(env) == expected


def test_tracing_is_off_without_configuration() -> None:
    assert not tracing.enabled()
    assert tracing.start("x") is None
    with tracing.span("x") as span:
        assert span is None
    tracing.finish(None, error="nothing happens")


def test_extract_then_inject_round_trips_over_a_header_dict() -> None:
    headers = {"traceparent": GOOD, "tracestate": "vendor=1", S.HDR_CORRELATION_ID: "c-1"}
    out = tracing.inject({S.HDR_MSG_ID: "m"}, tracing.extract(headers))
    assert out == {S.HDR_MSG_ID: "m", "traceparent": GOOD, "tracestate": "vendor=1"}


def test_header_names_match_case_insensitively() -> None:
    out = tracing.inject({}, tracing.extract({"Traceparent": GOOD}))
    assert out["traceparent"] == GOOD


@pytest.mark.parametrize("bad", ["00-zzz-yyy-01", f"00-{'0' * 32}-{SID}-01", "", "x" * 600])
def test_malformed_traceparent_carries_no_context(bad: str) -> None:
    """Nothing to continue: the headers stay as they were, a span would start a trace."""
    out = tracing.inject({"traceparent": bad}, tracing.extract({"traceparent": bad}))
    assert out == {"traceparent": bad}


def test_outgoing_keeps_headers_without_a_caller_span() -> None:
    with tracing.outgoing("publish x", {"a": "1"}) as headers:
        assert headers == {"a": "1"}


def test_outgoing_propagates_the_callers_own_span() -> None:
    """An application with its own OpenTelemetry setup: its current span goes onward
    even though jetflow's tracing is off in this process."""
    tracer = TracerProvider().get_tracer("app")
    with tracer.start_as_current_span("caller") as caller, \
            tracing.outgoing("publish x", {"a": "1"}) as headers:
        ctx = caller.get_span_context()
        flags = f"{int(ctx.trace_flags):02x}"
        assert headers["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}"
        assert headers["a"] == "1"


def _log_line(fmt: logging.Formatter, message: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(tracing.ContextFilter())
    handler.setFormatter(fmt)
    logger = logging.getLogger("jetflow.test-tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_log_lines_carry_the_jobs_ids_inside_its_context_only() -> None:
    text = logging.Formatter(tracing.TEXT_FORMAT)
    with tracing.log_context({S.HDR_CORRELATION_ID: "order-7", "traceparent": GOOD}):
        inside = _log_line(text, "working")
    outside = _log_line(text, "idle")
    assert f"[corr=order-7 trace={TID}]: working" in inside
    assert "[corr=- trace=-]: idle" in outside


def test_json_log_lines() -> None:
    with tracing.log_context({S.HDR_CORRELATION_ID: "order-7", "traceparent": GOOD}):
        line = json.loads(_log_line(tracing.JsonFormatter("jetflow-worker"), "working"))
    assert line["message"] == "working"
    assert line["level"] == "WARNING"
    assert line["service"] == "jetflow-worker"
    assert (line["correlation_id"], line["trace_id"]) == ("order-7", TID)
    assert line["ts"].endswith("Z")


def _span(span_id: str, parent: str | None, name: str, start: int,
          error: bool = False) -> dict[str, object]:
    return {"trace_id": TID, "span_id": span_id, "parent_span_id": parent, "name": name,
            "start_ns": start, "end_ns": start + 2_000_000, "service": "svc",
            "attributes": {"jetflow.attempt": 1} if name == "attempt" else {},
            "status": {"code": "error" if error else "unset", "message": "boom"}}


def test_span_tree_orders_children_and_shows_orphans_as_roots() -> None:
    spans = [_span("c", "a", "record", 30), _span("a", "gone", "attempt", 10),
             _span("b", "a", "claim", 20, error=True), _span("d", None, "other root", 5)]
    lines = span_tree(spans)  # type: ignore[arg-type]
    names = [line.split("└─ ")[1].split("  ")[0] for line in lines]
    assert names == ["other root", "attempt", "claim", "record"]
    depth = [line.index("└─") for line in lines]
    assert depth[0] == depth[1] < depth[2] == depth[3]
    assert "attempt=1" in lines[1]
    assert "ERROR boom" in lines[2]


def test_collector_decodes_what_the_otlp_exporter_sends() -> None:
    with Collector() as collector:
        provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
        provider.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=collector.url + "/v1/traces")))
        tracer = provider.get_tracer("t")
        attributes = {"jetflow.attempt": 2, "messaging.system": "nats", "ok": True,
                      "ratio": 0.5, "list": ["a", "b"]}
        with tracer.start_as_current_span("parent", kind=SpanKind.CONSUMER) as parent, \
                tracer.start_as_current_span("child", attributes=attributes) as child:
            child.add_event("exception", {"exception.type": "RuntimeError"})
            child.set_status(Status(StatusCode.ERROR, "bad"))
        provider.shutdown()
        spans = collector.wait_for(lambda s: len(s) == 2, timeout_s=5.0)
    by_name = {s["name"]: s for s in spans}
    ctx = parent.get_span_context()
    assert by_name["parent"]["trace_id"] == f"{ctx.trace_id:032x}"
    assert by_name["parent"]["span_id"] == f"{ctx.span_id:016x}"
    assert by_name["parent"]["parent_span_id"] is None
    assert by_name["parent"]["kind"] == "consumer"
    assert by_name["child"]["parent_span_id"] == by_name["parent"]["span_id"]
    assert by_name["child"]["attributes"] == {"jetflow.attempt": 2, "messaging.system": "nats",
                                              "ok": True, "ratio": 0.5, "list": ["a", "b"]}
    assert by_name["child"]["status"] == {"code": "error", "message": "bad"}
    assert by_name["child"]["events"][0]["name"] == "exception"
    assert by_name["child"]["service"] == "unit"
