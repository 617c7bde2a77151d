"""A small OTLP/HTTP trace receiver: ``POST /v1/traces`` with an
``ExportTraceServiceRequest`` protobuf (what the OTLP exporters and Jaeger speak on 4318).

It keeps the spans it receives, flattened to plain dicts (and appends them, one JSON
object per line, to a file if given), for ``jetflow collector``, ``jetflow up
--collect-traces``, ``jetflow trace`` and the tests. It is for local debugging and tests:
a real deployment sends its spans to Jaeger or an OpenTelemetry Collector.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = ["Collector", "decode_spans", "load_spans"]

SpanDict = dict[str, Any]


# -- decoding -------------------------------------------------------------------------------

def decode_spans(body: bytes) -> list[SpanDict]:
    """The spans of one ``ExportTraceServiceRequest``, flattened."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out: list[SpanDict] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            out.extend(_span(s, resource) for s in scope_spans.spans)
    return out


def _span(span: Any, resource: dict[str, Any]) -> SpanDict:
    return {
        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex() or None, "name": span.name,
        "kind": Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower(),
        "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
        "service": resource.get("service.name", ""), "resource": resource,
        "attributes": _attributes(span.attributes),
        "events": [{"name": e.name, "attributes": _attributes(e.attributes)}
                   for e in span.events],
        "status": {"code": Status.StatusCode.Name(span.status.code)
                   .removeprefix("STATUS_CODE_").lower(), "message": span.status.message},
    }


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def load_spans(path: Path) -> list[SpanDict]:
    """Spans a collector appended to ``path`` (unreadable lines are skipped)."""
    spans: list[SpanDict] = []
    with path.open() as f:
        for line in f:
            try:
                spans.append(json.loads(line))
            except ValueError:
                continue
    return spans


# -- serving --------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
        if not self.path.rstrip("/").endswith("/v1/traces"):
            self._answer(404, b"only /v1/traces is served here", "text/plain")
            return
        if "json" in (self.headers.get("Content-Type") or ""):
            self._answer(415, b"send OTLP protobuf (application/x-protobuf)", "text/plain")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            spans = decode_spans(body)
        except Exception as exc:  # noqa: BLE001 - a bad request is the sender's problem
            self._answer(400, f"cannot decode: {exc}".encode(), "text/plain")
            return
        self.server.received(spans)
        self._answer(200, ExportTraceServiceResponse().SerializeToString(),
                     "application/x-protobuf")

    def _answer(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    received: Callable[[list[SpanDict]], None]


class Collector:
    """Receives spans on ``url`` (``OTEL_EXPORTER_OTLP_ENDPOINT``) in a background thread.

    ::

        with Collector(port=0) as collector:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.url
            ...
            spans = collector.wait_for(lambda s: len(s) >= 5, timeout_s=10)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 out: Path | None = None, keep: bool = True) -> None:
        self.host = host
        self.port = port
        self.out = out
        self.keep = keep  # keep spans in memory (a long-running collector may not)
        self.count = 0
        self._spans: list[SpanDict] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the collector first"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> Collector:
        self._server = _Server((self.host, self.port), _Handler)
        self._server.received = self._received
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="otlp-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
        self._server = self._thread = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _received(self, spans: list[SpanDict]) -> None:
        with self._lock:
            self.count += len(spans)
            if self.keep:
                self._spans.extend(spans)
            if self.out is not None:
                with self.out.open("a") as f:
                    f.writelines(json.dumps(s) + "\n" for s in spans)

    def spans(self) -> list[SpanDict]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[SpanDict]], bool],
                 timeout_s: float = 10.0) -> list[SpanDict]:
        """Poll until ``predicate(spans)`` holds; the spans then. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"collector: condition not met in {timeout_s:g}s with "
                                   f"{len(spans)} spans: {summary(spans)}")
            time.sleep(0.05)


def summary(spans: list[SpanDict]) -> list[str]:
    return [f"{s['service']}:{s['name']}" for s in spans]


def trace_ids(spans: list[SpanDict]) -> Iterator[str]:
    return iter(dict.fromkeys(s["trace_id"] for s in spans))
