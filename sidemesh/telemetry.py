"""Tracing for every component: a tracer provider configured by the standard ``OTEL_*`` variables.

Tracing is off unless an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off again. Spans are exported by the SDK's
``BatchSpanProcessor`` from its own thread, out of a bounded queue: a slow or absent collector
fills the queue and spans are dropped, never the requests. The SDK drops silently, so the processor
and the exporter are wrapped to count what is lost in ``sidemesh_tracing_spans_dropped_total``.

Each component instance gets its own provider (no global state): tests run several sidecars in one
process, each with its own service name.
"""

# ruff: noqa: E402  (the span limit variables are withheld before the SDK is imported: see below)
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sidemesh import semconv, tracing_settings

# Before OpenTelemetry's imports, which read some variables and raise on a bad value.
tracing_settings.withhold_unusable()

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import sampling as samplers
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from sidemesh.later import Later
from sidemesh.prometheus import CollectorRegistry, Counter
from sidemesh.propagation import Format
from sidemesh.tracing_settings import (  # (re-exported: the settings are read there)
    DEFAULT_PROPAGATORS as DEFAULT_PROPAGATORS,
)
from sidemesh.tracing_settings import OTLP_HTTP_PORT as OTLP_HTTP_PORT
from sidemesh.tracing_settings import PROPAGATORS as PROPAGATORS
from sidemesh.tracing_settings import PROTOCOLS as PROTOCOLS
from sidemesh.tracing_settings import SAMPLERS as SAMPLERS
from sidemesh.tracing_settings import SPAN_LIMITS, _ignored, limit_problem, limit_value
from sidemesh.tracing_settings import TracingSettings as TracingSettings
from sidemesh.tracing_settings import new_trace_formats as new_trace_formats
from sidemesh.tracing_settings import settings_from_env as settings_from_env

log = logging.getLogger("sidemesh.telemetry")

WARN_EVERY = 60.0  # seconds between two "spans not exported" warnings
DEFER_S = 0.25  # a deferred span is made at most this long after its request ended (Tracing.defer)
DEFER_BATCH = 64  # ... or as soon as this many are waiting
_TRACE_ID_LOW = (1 << 64) - 1  # the bits TraceIdRatioBased compares (its TRACE_ID_LIMIT)
# The OTLP exporters log every failed attempt; failures are counted and warned about here instead,
# with what the exporter said (_ExportMessages). (The HTTP exporter logs through its own logger.)
_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.exporter.otlp.common.http",
)
# Warn for every invalid tracestate, and every traceparent or tracestate over its length limit, they
# are given: any caller could write a log line per request. Such a header is dropped, as W3C Trace
# Context says.
_PER_REQUEST_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")
# Every span attribute value is cut to this many characters unless OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT
# or OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise (the SDK's default is no limit). What
# callers choose is cut shorter where it is recorded (semconv.MAX_REQUEST_ATTRIBUTE).
DEFAULT_ATTRIBUTE_LENGTH = 1024


_DEFAULT_COUNT = 128  # the SDK's default for each count limit


def span_limits(environ: Mapping[str, str]) -> SpanLimits:
    """The SDK's limits as OTEL_* sets them, with a bound on attribute values by default. A value
    that is no integer from 0 to 2^31 - 1 is warned about and ignored (the SDK raised, and the component
    stopped)."""
    values: dict[str, int | None] = {}  # None: unset (or ignored)
    for param, (variable, _) in SPAN_LIMITS.items():
        raw = environ.get(variable, "").strip()
        values[param] = None
        if not raw:
            continue
        value = limit_value(raw)
        if value is None:
            _ignored(*limit_problem(variable, raw))
        else:
            values[param] = value
    for param, (_, generic) in SPAN_LIMITS.items():
        if values[param] is None and generic is not None:
            values[param] = values[generic]
    if values["max_span_attribute_length"] is None:
        values["max_span_attribute_length"] = DEFAULT_ATTRIBUTE_LENGTH
    return SpanLimits(
        **{
            param: value
            if value is not None
            else (SpanLimits.UNSET if param == "max_attribute_length" else _DEFAULT_COUNT)
            for param, value in values.items()
        }
    )


def make_sampler(settings: TracingSettings, caller_samples_roots: bool = False) -> samplers.Sampler:
    """The SDK sampler. With ``caller_samples_roots`` (and a parent-based sampler), the caller has
    already decided that a span without a parent is sampled (``Tracing.sample_root``)."""
    if caller_samples_roots and settings.sampler.startswith("parentbased_"):
        return samplers.ParentBased(samplers.ALWAYS_ON)
    root: samplers.Sampler = {
        "always_on": samplers.ALWAYS_ON,
        "always_off": samplers.ALWAYS_OFF,
    }.get(settings.sampler.removeprefix("parentbased_"), samplers.TraceIdRatioBased(settings.ratio))
    return samplers.ParentBased(root) if settings.sampler.startswith("parentbased_") else root


def make_exporter(settings: TracingSettings) -> SpanExporter:
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        # Its logger drops a record like the one before it within 20 s (the SDK's DuplicateFilter,
        # added at import): the next batch's failure had no reason. Ours is the warning a minute.
        exporter_log = logging.getLogger(_EXPORTER_LOGGERS[0])
        for dedup in [f for f in exporter_log.filters if type(f).__name__ == "DuplicateFilter"]:
            exporter_log.removeFilter(dedup)
        from grpc import Compression as GrpcCompression

        return GrpcExporter(
            **_no_meter(GrpcExporter),
            endpoint=settings.endpoint,
            insecure=settings.endpoint.lower().startswith("http://"),
            timeout=settings.timeout,
            compression=GrpcCompression.Gzip
            if settings.compression == "gzip"
            else GrpcCompression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(
        **_no_meter(HttpExporter),
        endpoint=settings.endpoint,
        timeout=settings.timeout,
        compression=HttpCompression.Gzip if settings.compression == "gzip" else HttpCompression.NoCompression,
    )


def _no_meter(kind: type) -> dict[str, Any]:
    """``meter_provider=NoOpMeterProvider()`` for an SDK class that takes one (TracerProvider from
    1.40, BatchSpanProcessor from 1.41, the OTLP exporters later), so that it never looks up the
    global one (a bad OTEL_PYTHON_METER_PROVIDER raised there); nothing for older versions."""
    if "meter_provider" in inspect.signature(kind).parameters:
        return {"meter_provider": NoOpMeterProvider()}
    return {}


class SpanCounters:
    """Spans exported and dropped, by reason, in the component's Prometheus registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dropped = Counter(
            "sidemesh_tracing_spans_dropped",
            "Sampled spans that never reached the collector: queue_full (the collector is slow or "
            "absent) or export_failed.",
            ["reason"],
            registry=registry,
        )
        self.exported = Counter(
            "sidemesh_tracing_spans_exported",
            "Spans the collector acknowledged (an OTLP partial success's rejected spans included: the exporters do not report them).",
            registry=registry,
        )
        for reason in ("queue_full", "export_failed"):
            self.dropped.labels(reason)
        self._lock = threading.Lock()
        self.queued = 0  # spans in the processor's queue: ended minus handed to the exporter

    def enqueue(self, capacity: int) -> None:
        with self._lock:
            if self.queued >= capacity:  # the SDK's deque drops its oldest span to take this one
                self.dropped.labels("queue_full").inc()
            else:
                self.queued += 1

    def dequeue(self, count: int) -> None:
        with self._lock:
            self.queued = max(0, self.queued - count)


def _resource_attribute(text: str, key: str) -> str | None:
    """One attribute of an OTEL_RESOURCE_ATTRIBUTES value (``k=v,k2=v2``, percent-encoded)."""
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if sep and urllib.parse.unquote(name.strip()) == key:
            return urllib.parse.unquote(value.strip()) or None
    return None


class _ExportMessages(logging.Handler):
    """What the OTLP exporter logged while its thread exported one batch (a status code, a
    transient error, a request too large): the exporters' loggers go here, not to the log, and
    ``CountingExporter`` names it in its own once-a-minute warning. Per thread: each batch
    processor exports from a thread of its own."""

    KEPT = 3  # messages per batch (the first error and the last word are enough)

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        messages: list[str] | None = getattr(self._local, "messages", None)
        if messages is None:  # not during an export (the exporter being made: a bad certificate
            logging.getLogger().handle(record)  # file): to the log, as before
        elif len(messages) < self.KEPT:
            with contextlib.suppress(Exception):  # (a record that cannot be formatted: no reason)
                messages.append(record.getMessage()[:300])

    def begin(self) -> None:
        self._local.messages = []

    def take(self) -> str:
        messages: list[str] = getattr(self._local, "messages", None) or []
        self._local.messages = None
        return "; ".join(dict.fromkeys(messages)) or "no reason given"


_EXPORT_MESSAGES = _ExportMessages()


class CountingExporter(SpanExporter):
    """Counts each batch's outcome; an exception from the exporter counts as a failure."""

    def __init__(self, inner: SpanExporter, counters: SpanCounters, endpoint: str = "") -> None:
        self.inner = inner
        self.counters = counters
        self.endpoint = endpoint
        self._warned = -WARN_EVERY

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.counters.dequeue(len(spans))
        _EXPORT_MESSAGES.begin()
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            log.debug("span export raised", exc_info=exc)
            logging.getLogger(_EXPORTER_LOGGERS[0]).error("the exporter raised %r", exc)
            result = SpanExportResult.FAILURE
        reason = _EXPORT_MESSAGES.take()
        if result is SpanExportResult.SUCCESS:
            self.counters.exported.inc(len(spans))
        else:
            self.counters.dropped.labels("export_failed").inc(len(spans))
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY:  # one line a minute, not one per batch
                self._warned = now
                log.warning(
                    "spans not exported (counted in sidemesh_tracing_spans_dropped_total): is the collector "
                    "up, and is the endpoint its OTLP port and path?",
                    extra={"endpoint": self.endpoint, "spans": len(spans), "reason": reason},
                )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans its full queue drops."""

    def __init__(self, exporter: SpanExporter, settings: TracingSettings, counters: SpanCounters) -> None:
        super().__init__(
            CountingExporter(exporter, counters, settings.endpoint),
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay_ms,
            max_export_batch_size=settings.max_export_batch_size,
            export_timeout_millis=settings.export_timeout_ms,
            **_no_meter(BatchSpanProcessor),  # (else it reads OTEL_PYTHON_METER_PROVIDER, and raises)
        )
        self.capacity = settings.max_queue_size
        self.counters = counters

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.counters.enqueue(self.capacity)
        super().on_end(span)


class PresetIds(RandomIdGenerator):
    """The SDK's random ids, except that a caller that chose a span's ids before making it (to write
    the next hop's trace headers first) hands them over with ``preset`` just before ``start_span``.
    Only the thread that makes the spans may preset."""

    def __init__(self) -> None:
        self._trace_id = self._span_id = 0

    def preset(self, trace_id: int, span_id: int) -> None:
        self._trace_id, self._span_id = trace_id, span_id

    def generate_trace_id(self) -> int:
        trace_id, self._trace_id = self._trace_id, 0
        return trace_id or super().generate_trace_id()

    def generate_span_id(self) -> int:
        # The SDK asks once per span, after the trace id (which it does not ask for when the span
        # has a parent): both presets end here, so none outlives its span.
        span_id, self._span_id, self._trace_id = self._span_id, 0, 0
        return span_id or super().generate_span_id()


class Tracing:
    """A component's tracer provider and its tracer."""

    def __init__(
        self,
        provider: TracerProvider,
        settings: TracingSettings,
        counters: SpanCounters,
        caller_samples_roots: bool = False,
        ids: PresetIds | None = None,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.counters = counters
        self.ids = ids or PresetIds()
        self.tracer: trace.Tracer = provider.get_tracer("sidemesh")
        self._deferred: list[Callable[[], None]] = []
        self._later = Later(DEFER_S, self.make_deferred)
        # Parent-based sampling decided before any SDK call (the sidecar's fast path for unsampled
        # requests): a parent's flag decides, else sample_root().
        self.fast_sampling = caller_samples_roots and settings.sampler.startswith("parentbased_")
        root = settings.sampler.removeprefix("parentbased_")
        self.root_ratio = {"always_on": 1.0, "always_off": 0.0}.get(root, settings.ratio)
        self.w3c_only = settings.new_trace_formats == (Format.W3C,)  # new traces: the default

    def defer(self, make_span: Callable[[], None]) -> None:
        """Make a span a little later, with others: at most DEFER_S later, or once DEFER_BATCH (or
        the export queue's size, if smaller) are waiting; on the event loop's thread, or at once
        when no loop runs. So no more wait here than the export queue holds."""
        deferred = self._deferred
        deferred.append(make_span)
        if len(deferred) >= min(DEFER_BATCH, self.settings.max_queue_size):
            self.make_deferred()
        else:
            self._later.due()

    def make_deferred(self) -> None:
        """Make every waiting span now (they go to the export queue)."""
        self._later.cancel()
        deferred, self._deferred = self._deferred, []
        for make_span in deferred:
            try:
                make_span()
            except Exception:  # a span is never worth a request: log it, go on
                log.exception("could not make a span")

    def sample_root(self, trace_id: int | None = None) -> bool:
        """Whether a request that carries no sampling decision starts (or joins) a sampled trace.
        With the ``trace_id`` it comes with (B3 that leaves the decision to the receiver), the
        decision is that of the SDK's TraceIdRatioBased: the id's lower 64 bits against the ratio,
        so every hop of one trace decides alike (a coin per hop broke such traces in pieces)."""
        if trace_id is not None:
            return trace_id & _TRACE_ID_LOW < round(self.root_ratio * (_TRACE_ID_LOW + 1))
        return self.root_ratio >= 1.0 or (self.root_ratio > 0.0 and random.random() < self.root_ratio)

    async def close(self, timeout: float = 2.0) -> None:
        """Flush and stop, waiting at most ``timeout`` seconds (an absent collector must not hold up
        a drain): the SDK's shutdown blocks, so it runs in a daemon thread that may outlive us."""
        self.make_deferred()
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()

        def run() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed first
                    loop.call_soon_threadsafe(finished.set)

        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(finished.wait(), timeout)
        except TimeoutError:
            log.warning("tracing shutdown timed out; unsent spans are lost", extra={"timeout": timeout})


def start_tracing(
    default_service: str,
    registry: CollectorRegistry,
    attributes: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
    caller_samples_roots: bool = False,
    settings: TracingSettings | None = None,
) -> Tracing | None:
    """Tracing as the environment configures it, or None when it is off.

    ``attributes`` become resource attributes (k8s.namespace.name, sidemesh.identity, ...);
    The service name is OTEL_SERVICE_NAME, else the ``service.name`` of OTEL_RESOURCE_ATTRIBUTES,
    else ``default_service`` (the SDK's order); the rest of OTEL_RESOURCE_ATTRIBUTES is merged by
    the SDK, under ``attributes``.
    """
    settings = settings or settings_from_env(environ)  # (given: read once, by a caller that checked)
    if settings is None:
        return None
    semconv.use_known_methods(settings.known_methods)  # (one tracing configuration per process)
    for name in _EXPORTER_LOGGERS:  # their words go into our warning (_ExportMessages)
        exporter_log = logging.getLogger(name)
        exporter_log.setLevel(logging.WARNING)
        exporter_log.propagate = False
        if _EXPORT_MESSAGES not in exporter_log.handlers:
            exporter_log.addHandler(_EXPORT_MESSAGES)
    for name in _PER_REQUEST_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    attrs = {k: v for k, v in (attributes or {}).items() if v}
    env = os.environ if environ is None else environ
    attrs["service.name"] = (
        settings.service_name
        or _resource_attribute(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "service.name")
        or default_service
    )
    try:
        exporter = exporter or make_exporter(settings)
        ids = PresetIds()
        provider = TracerProvider(
            resource=Resource.create(attrs),
            sampler=make_sampler(settings, caller_samples_roots),
            id_generator=ids,
            span_limits=span_limits(env),
            shutdown_on_exit=False,  # Tracing.close() flushes within a bound; the SDK's atexit waits 30 s
            **_no_meter(TracerProvider),  # (the SDK's own span metrics: not kept)
        )
        counters = SpanCounters(registry)
        provider.add_span_processor(CountingBatchProcessor(exporter, settings, counters))
        tracing = Tracing(provider, settings, counters, caller_samples_roots, ids)
    except Exception as exc:  # the SDK's or an exporter's own reading of a variable: never a stop
        log.error(
            "tracing could not start; running without it",
            extra={"error": f"{type(exc).__name__}: {exc}", "endpoint": settings.endpoint},
        )
        return None
    log.info(
        "tracing on",
        extra={
            "endpoint": settings.endpoint,
            "protocol": settings.protocol,
            "sampler": settings.sampler,
            "ratio": settings.ratio,
            "service": attrs["service.name"],
        },
    )
    return tracing
