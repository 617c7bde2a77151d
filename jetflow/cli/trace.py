"""``jetflow trace <job>`` and ``jetflow collector``: finding a job's trace.

``trace`` reads the job's events with their headers from the stream and prints the trace
id(s) they carry with a Jaeger link; when a local collector's span file is there (``jetflow
collector`` or ``jetflow up --collect-traces`` write ``<data>/spans.jsonl``), it prints the
span tree too.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from jetflow.adapters.tracing import trace_id_of
from jetflow.cli.options import common_options
from jetflow.core import subjects as S

__all__ = ["add_commands", "span_tree", "traces_of"]

DEFAULT_JAEGER = "http://localhost:16686"
SpanDict = dict[str, Any]
SHOWN_ATTRIBUTES = ("jetflow.attempt", "jetflow.outcome", "jetflow.worker_id",
                    "jetflow.queue_wait_ms", "jetflow.decision", "jetflow.error_type")


# -- the commands -----------------------------------------------------------------------------

async def cmd_trace(a: argparse.Namespace) -> int:
    from jetflow.adapters.client import JobError, connect

    client = await connect(a.nats)
    try:
        history = await client.history_with_headers(S.check_job_id(a.job_id))
    finally:
        await client.close()
    if not history:
        raise JobError(f"no job {a.job_id!r} in the log")
    spans_file = _spans_file(a)
    spans = _load(spans_file)
    traces = traces_of(history)
    correlation = next((h.get(S.HDR_CORRELATION_ID) for _e, h in history
                        if h.get(S.HDR_CORRELATION_ID)), None)
    if a.json:
        print(json.dumps(_as_json(a, traces, correlation, spans)))
        return 0
    for line in _lines(a, traces, correlation, spans, spans_file):
        print(line)
    return 0


def _as_json(a: argparse.Namespace, traces: dict[str, list[str]], correlation: str | None,
             spans: list[SpanDict]) -> dict[str, Any]:
    return {"job_id": a.job_id, "correlation_id": correlation, "traces": [
        {"trace_id": tid, "events": events, "jaeger_url": f"{a.jaeger}/trace/{tid}",
         "spans": [s for s in spans if s["trace_id"] == tid]}
        for tid, events in traces.items()]}


def _lines(a: argparse.Namespace, traces: dict[str, list[str]], correlation: str | None,
           spans: list[SpanDict], spans_file: Path | None) -> list[str]:
    lines = [f"job {a.job_id}  correlation id {correlation or '-'}"]
    if not traces:
        lines.append("  no trace context on its events (submitted while tracing was off, "
                     "and without a traceparent header)")
    for tid, events in traces.items():
        lines.append(f"trace {tid}  ({', '.join(events)})")
        lines.append(f"  Jaeger: {a.jaeger}/trace/{tid}")
        mine = [s for s in spans if s["trace_id"] == tid]
        if mine:
            lines.extend(span_tree(mine))
        elif spans_file is not None:
            lines.append(f"  (no spans of this trace in {spans_file})")
    return lines


async def cmd_collector(a: argparse.Namespace) -> int:
    from jetflow.adapters.collector import Collector
    from jetflow.adapters.runtime import wait_for_signal

    out = Path(a.out) if a.out else None
    with Collector(a.host, a.port, out=out, keep=False) as collector:
        print(f"collecting OTLP/HTTP traces at {collector.url} (spans to {out or 'nowhere'})",
              flush=True)
        print(f"  export OTEL_EXPORTER_OTLP_ENDPOINT={collector.url}", flush=True)
        await wait_for_signal()
        print(f"received {collector.count} spans", flush=True)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("trace", help="a job's trace id(s), Jaeger link and span tree",
                       description="Print the trace id(s) a job's events carry and a Jaeger "
                                   "link; with a local collector's span file, the span tree.")
    common_options(p)
    p.add_argument("job_id")
    p.add_argument("--jaeger", default=os.environ.get("JETFLOW_JAEGER_URL", DEFAULT_JAEGER),
                   help=f"Jaeger UI base URL (env JETFLOW_JAEGER_URL, default {DEFAULT_JAEGER})")
    p.add_argument("--spans", help="span file of a local collector (default "
                                   "<data>/spans.jsonl when it exists)")
    p.add_argument("--data", default=".jetflow", help="data directory (./.jetflow)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("collector", help="a local OTLP/HTTP trace receiver (for debugging)",
                       description="Receive spans over OTLP/HTTP and append them to a file "
                                   "that `jetflow trace` reads. Use Jaeger for real work.")
    common_options(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318, help="port (4318, OTLP/HTTP's own)")
    p.add_argument("--out", default=".jetflow/spans.jsonl",
                   help="span file (.jetflow/spans.jsonl); '' keeps none")
    p.set_defaults(run=cmd_collector)


# -- reading ----------------------------------------------------------------------------------

def traces_of(history: list[tuple[Any, dict[str, str]]]) -> dict[str, list[str]]:
    """Trace id -> the types of the events that carry it, in the order they appear."""
    traces: dict[str, list[str]] = {}
    for event, headers in history:
        tid = trace_id_of(headers.get(S.HDR_TRACEPARENT))
        if tid:
            traces.setdefault(tid, []).append(event.type)
    return traces


def _spans_file(a: argparse.Namespace) -> Path | None:
    if a.spans:
        return Path(a.spans)
    default = Path(a.data) / "spans.jsonl"
    return default if default.exists() else None


def _load(path: Path | None) -> list[SpanDict]:
    if path is None or not path.exists():
        return []
    from jetflow.adapters.collector import load_spans

    return load_spans(path)


# -- the tree ---------------------------------------------------------------------------------

def span_tree(spans: list[SpanDict]) -> list[str]:
    """The spans of one trace as an indented tree, children in start order; a span whose
    parent was not collected (the submitter's, say) is shown as a root."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[SpanDict]] = {}
    for s in spans:
        parent = s.get("parent_span_id")
        children.setdefault(parent if parent in ids else None, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: s["start_ns"])
    t0 = min(s["start_ns"] for s in spans)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, []):
            lines.append("  " + "   " * depth + "└─ " + _describe(s, t0))
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return lines


def _describe(s: SpanDict, t0: int) -> str:
    took = (s["end_ns"] - s["start_ns"]) / 1e6
    at = (s["start_ns"] - t0) / 1e6
    attrs = s.get("attributes", {})
    shown = " ".join(f"{k.removeprefix('jetflow.')}={attrs[k]}" for k in SHOWN_ATTRIBUTES
                     if k in attrs)
    error = f" ERROR {s['status'].get('message', '')}" if s["status"]["code"] == "error" else ""
    return (f"{s['name']}  [{s['service']}] +{at:.1f}ms {took:.1f}ms"
            + (f"  {shown}" if shown else "") + error)
