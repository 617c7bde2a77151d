"""Traces and log context: the OpenTelemetry adapter of jetflow (impure, like ``bus``).

- :func:`setup` installs the SDK from the standard variables (``OTEL_TRACES_EXPORTER``
  = ``otlp``/``console``/``none``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
  ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``). Tracing is **off** unless an exporter is asked
  for (``OTEL_TRACES_EXPORTER`` or an OTLP endpoint is set, or ``--trace-console``): then
  no SDK is imported and every helper here returns at once.
- W3C trace context travels in NATS headers (``traceparent``/``tracestate``):
  :func:`extract` and :func:`inject` use a TextMap getter/setter over a header dict.
- Helpers for the edges of message handling: :func:`span` (a context manager),
  :func:`start`/:func:`finish` for spans of a pipelined batch, :func:`fail` for errors.
- Log lines carry the correlation id and trace id: :func:`log_context` sets them for a
  job's scope, :func:`install_logging` adds the filter and a text or JSON formatter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from jetflow.core import subjects as S

__all__ = [
    "setup",
    "shutdown",
    "enabled",
    "wanted_exporters",
    "extract",
    "inject",
    "span",
    "start",
    "finish",
    "fail",
    "annotate",
    "add_event",
    "headers_of",
    "outgoing",
    "messaging",
    "job_attributes",
    "trace_id_of",
    "log_context",
    "install_logging",
    "ContextFilter",
    "JsonFormatter",
]

log = logging.getLogger("jetflow.tracing")

EXPORTERS = ("otlp", "console")
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"
                          r"(-.*)?[ \t]*$")

_tracer: Any = None  # an SDK tracer once setup() found an exporter; None = tracing off
_provider: Any = None
_propagator: Any = None
_log_ids: ContextVar[tuple[str, str]] = ContextVar("jetflow_log_ids", default=("-", "-"))


# -- setup --------------------------------------------------------------------------------

def wanted_exporters(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters the environment asks for; [] means tracing stays off.

    ``OTEL_TRACES_EXPORTER`` (comma-separated) wins; ``none`` turns tracing off. Without
    it, an OTLP endpoint alone (``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``) means ``otlp``.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names and (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                      or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    if "none" in names:
        return []
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        log.warning("ignoring OTEL_TRACES_EXPORTER %s: jetflow exports with %s", unknown,
                    " or ".join(EXPORTERS))
    return list(dict.fromkeys(n for n in names if n in EXPORTERS))


def ask_for_console() -> None:
    """``--trace-console``: add the console exporter, for this process and its children."""
    names = [n for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")
             if n.strip() and n.strip() != "none"]
    if not names and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                      or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    os.environ["OTEL_TRACES_EXPORTER"] = ",".join(dict.fromkeys([*names, "console"]))


def setup(role: str) -> bool:
    """Install a tracer provider for this process if an exporter is configured.

    ``role`` (sentinel, worker, plugin, cli...) names the service unless
    ``OTEL_SERVICE_NAME`` does. Returns whether tracing is on.
    """
    global _tracer, _provider
    exporters = wanted_exporters()
    if not exporters or _tracer is not None:
        return _tracer is not None
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or f"jetflow-{role}",
        "service.namespace": "jetflow", "jetflow.role": role, "process.pid": os.getpid()})
    _provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    for name in exporters:
        _provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("jetflow")
    context.get_current()  # loads the runtime context now, not in the first job (~0.1 s)
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout is for command output (and a worker child's protocol frames)
        return ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT


def _one_line(span: Any) -> str:
    ctx = span.get_span_context()
    parent = format(span.parent.span_id, "016x") if span.parent else "-"
    took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    attrs = " ".join(f"{k}={v}" for k, v in sorted((span.attributes or {}).items()))
    status = "" if span.status.is_ok else f" status={span.status.status_code.name}"
    return (f"span trace={ctx.trace_id:032x} id={ctx.span_id:016x} parent={parent} "
            f"{span.name!r} {took:.1f}ms{status} {attrs}\n")


def shutdown() -> None:
    """Flush and stop the exporters (services call it on the way out)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


# -- propagation over NATS headers ----------------------------------------------------------

def _w3c() -> Any:
    global _propagator
    if _propagator is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _propagator = TraceContextTextMapPropagator()
    return _propagator


class _HeaderGetter:
    """TextMap getter over a NATS header dict; header names match case-insensitively."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            value = next((v for k, v in carrier.items() if k.lower() == key), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


class _HeaderSetter:
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


GETTER = _HeaderGetter()
SETTER = _HeaderSetter()


def extract(headers: Mapping[str, str] | None) -> Any:
    """The OpenTelemetry context the headers carry (an empty one for a missing or
    malformed ``traceparent``: a span started in it begins a new trace)."""
    return _w3c().extract(headers or {}, getter=GETTER)


def inject(headers: Mapping[str, str] | None, context: Any = None) -> dict[str, str]:
    """A copy of ``headers`` whose ``traceparent``/``tracestate`` are those of ``context``
    (default: the current one); unchanged when that context has no valid span."""
    out = dict(headers or {})
    carrier: dict[str, str] = {}
    _w3c().inject(carrier, context=context, setter=SETTER)
    if carrier.get(S.HDR_TRACEPARENT):
        out.pop(S.HDR_TRACESTATE, None)
        out.update(carrier)
    return out


def headers_of(span_: Any, headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` carrying ``span_``'s context onwards (as they were if span_ is None)."""
    if span_ is None:
        return dict(headers or {})
    from opentelemetry import trace

    return inject(headers, trace.set_span_in_context(span_))


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a valid W3C ``traceparent`` (32 lowercase hex), else None.

    The same rules as the propagator: a header it would not continue has no trace id.
    """
    match = _TRACEPARENT.match(traceparent or "")
    if match is None:
        return None
    version, trace_id, span_id, _flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or version == "ff" \
            or (version == "00" and rest):
        return None
    return trace_id


# -- spans ----------------------------------------------------------------------------------

def _kind(name: str) -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind[name.upper()]


def _start(name: str, kind: str, parent: Mapping[str, str] | None,
           attributes: Mapping[str, Any] | None, start_time: float | None) -> Any:
    context = extract(parent) if parent is not None else None
    return _tracer.start_span(
        name, context=context, kind=_kind(kind), attributes=_clean(attributes),
        start_time=None if start_time is None else int(start_time * 1e9))


@contextlib.contextmanager
def span(name: str, *, kind: str = "internal", parent: Mapping[str, str] | None = None,
         attributes: Mapping[str, Any] | None = None,
         start_time: float | None = None) -> Iterator[Any]:
    """A span, current inside the block, child of ``parent`` (headers) if given, else of
    the current span. An exception leaving the block is recorded (status + event).
    Yields None, doing nothing, when tracing is off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import trace

    started = _start(name, kind, parent, attributes, start_time)
    with trace.use_span(started, end_on_exit=True, record_exception=True,
                        set_status_on_exception=True):
        yield started


def start(name: str, *, kind: str = "internal", parent: Mapping[str, str] | None = None,
          attributes: Mapping[str, Any] | None = None,
          start_time: float | None = None) -> Any:
    """Start a span that is not made current (spans of a pipelined batch); end it with
    :func:`finish`. None when tracing is off."""
    if _tracer is None:
        return None
    return _start(name, kind, parent, attributes, start_time)


def finish(span_: Any, *, error: str | None = None, **attributes: Any) -> None:
    """Set ``jetflow.*`` attributes, record ``error`` if any, and end the span."""
    if span_ is None:
        return
    if attributes:
        span_.set_attributes(job_attributes(**attributes))
    if error:
        fail(span_, error_type="Error", message=error)
    span_.end()


def fail(span_: Any, *, error_type: str, message: str, stacktrace: str | None = None) -> None:
    """Mark the span as failed: ERROR status and an ``exception`` event (for errors that
    arrive as data, e.g. a handler's failure reported by its child process)."""
    if span_ is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span_.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"[:1000]))
    event = {"exception.type": error_type, "exception.message": message}
    if stacktrace:
        event["exception.stacktrace"] = stacktrace
    span_.add_event("exception", event)


def add_event(name: str, **attributes: Any) -> None:
    """A ``jetflow.*``-attributed event on the current span (nothing when tracing is off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, job_attributes(**attributes))


def annotate(**attributes: Any) -> None:
    """Add ``jetflow.*`` attributes to the current span (nothing when tracing is off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(job_attributes(**attributes))


@contextlib.contextmanager
def outgoing(name: str, headers: Mapping[str, str], *,
             attributes: Mapping[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """A producer span around sending a message; yields ``headers`` carrying it onwards.

    With tracing off here, a caller's own current span (an application that set up
    OpenTelemetry itself) is still propagated; without one the headers stay as given.
    """
    if _tracer is not None:
        with span(name, kind="producer", attributes=attributes) as started:
            yield headers_of(started, headers)
        return
    trace_api = sys.modules.get("opentelemetry.trace")  # no OTel imported: no caller span
    if trace_api is not None and trace_api.get_current_span().get_span_context().is_valid:
        yield inject(headers)
        return
    yield dict(headers)


def messaging(destination: str, operation: str,
              message_id: str | None = None) -> dict[str, Any]:
    """OpenTelemetry messaging attributes of one NATS message."""
    attrs: dict[str, Any] = {"messaging.system": "nats",
                             "messaging.destination.name": destination,
                             "messaging.operation": operation,
                             "messaging.operation.type": operation}
    if message_id:
        attrs["messaging.message.id"] = message_id
    return attrs


def job_attributes(**values: Any) -> dict[str, Any]:
    """``jetflow.<name>`` attributes, without the ones that are None."""
    return {f"jetflow.{k}": v for k, v in values.items() if v is not None}


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if attributes is None else {k: v for k, v in attributes.items()
                                            if v is not None}


# -- log lines ------------------------------------------------------------------------------

@contextlib.contextmanager
def log_context(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Inside the block, log lines carry the correlation id and trace id of ``headers``."""
    headers = headers or {}
    token = _log_ids.set((headers.get(S.HDR_CORRELATION_ID) or "-",
                          trace_id_of(headers.get(S.HDR_TRACEPARENT)) or "-"))
    try:
        yield
    finally:
        _log_ids.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``correlation_id``, ``trace_id`` and ``span_id`` to every record ("-" when
    the line is not about one job): from the current span when tracing is on, else from
    the headers given to :func:`log_context`."""

    def filter(self, record: logging.LogRecord) -> bool:
        correlation_id, trace_id = _log_ids.get()
        span_id = "-"
        if _tracer is not None:
            from opentelemetry import trace

            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                trace_id, span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        record.correlation_id = correlation_id
        record.trace_id = trace_id
        record.span_id = span_id
        return True


TEXT_FORMAT = ("%(asctime)s %(levelname)s %(name)s [corr=%(correlation_id)s "
               "trace=%(trace_id)s]: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, exception."""

    def __init__(self, service: str = "jetflow") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "service": self.service,
            "pid": record.process, "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", "-"),
            "trace_id": getattr(record, "trace_id", "-"),
            "span_id": getattr(record, "span_id", "-")}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def install_logging(level: str, fmt: str = "text", *, service: str = "jetflow") -> None:
    """Log to stderr, every line with its correlation id and trace id (text or JSON)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(service) if fmt == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
