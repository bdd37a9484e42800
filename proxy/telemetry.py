"""The sidecar's per-request telemetry: golden metrics, route stats, the access log, and spans.

``ProxyObserver`` implements ``proxy.observe.Observer``. With tracing off, the trace headers pass
through unchanged and only metrics, route stats and the access log are kept, and OpenTelemetry is
not even imported; with tracing on, each request is a ``proxy.tracing.TracedRequest``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.metrics import ProxyMetrics, RequestSeries
from proxy.observe import RequestInfo, RequestResult, RequestSpan
from proxy.routes import RouteStats, route_of
from sidemesh.logging import BufferedLines
from sidemesh.prometheus import CollectorRegistry
from sidemesh.spiffe import SpiffeId, SpiffeIdError, WorkloadId
from sidemesh.tracing_settings import Format, settings_from_env

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext

    from sidemesh.telemetry import Tracing

access = logging.getLogger("sidemesh.proxy.access")

_MAX_IDENTITIES = 4096


def start_sidecar_tracing(workload: str, spiffe_id: str, registry: CollectorRegistry) -> Tracing | None:
    """Tracing as OTEL_* configures it; service.name ``<serviceaccount>.<namespace>`` as Istio names
    a workload's spans, and the pod and SPIFFE ID as resource attributes. The SDK is imported only
    when the variables turn tracing on."""
    settings = settings_from_env()
    if settings is None:
        return None
    from sidemesh.telemetry import start_tracing

    namespace, _, pod = workload.partition("/")
    try:
        wid = WorkloadId.from_spiffe_id(SpiffeId.parse(spiffe_id))
        service = f"{wid.service_account}.{wid.namespace}"
    except SpiffeIdError:
        service = "sidemesh-proxy"
    attributes = {
        "k8s.namespace.name": namespace,
        "k8s.pod.name": pod,
        "sidemesh.identity": spiffe_id,
        "service.namespace": namespace,
    }
    return start_tracing(service, registry, attributes, caller_samples_roots=True, settings=settings)


def identity_label(spiffe_id: str | None, cache: dict[str, str]) -> str:
    """``spiffe://td/ns/X/sa/Y`` -> ``X/Y`` (a bounded label); "unauthenticated", or "unknown"."""
    if not spiffe_id:
        return "unknown"
    label = cache.get(spiffe_id)
    if label is None:
        parts = spiffe_id.split("/")
        if len(parts) == 7 and parts[0] == "spiffe:" and parts[3] == "ns" and parts[5] == "sa":
            label = f"{parts[4]}/{parts[6]}"
        elif spiffe_id == "unauthenticated":
            label = spiffe_id
        else:
            label = "other"
        if len(cache) >= _MAX_IDENTITIES:
            cache.clear()
        cache[spiffe_id] = label
    return label


def status_class(result: RequestResult) -> str:
    if result.status is None:
        return "reset"
    return f"{result.status // 100}xx" if 100 <= result.status < 600 else "other"


def grpc_status_label(code: int | None) -> str:
    """The code as a label value: "" for plain HTTP, "other" for a number gRPC does not define
    (a peer's trailer: its values must not grow the series)."""
    if code is None:
        return ""
    return str(code) if 0 <= code <= 16 else "other"


def succeeded(result: RequestResult) -> bool:
    """Linkerd's success rate: no 5xx, no reset, a gRPC status of OK (or none), not denied."""
    return (
        result.status is not None
        and result.status < 500
        and result.grpc_status in (None, 0)
        and result.decision != "deny"
        and result.error is None
    )


class ProxyObserver:
    def __init__(
        self,
        metrics: ProxyMetrics,
        routes: RouteStats,
        own_identity: str,
        tracing: Tracing | None = None,
        access_log: bool = True,
        access_log_sample: float = 1.0,
        rand: Callable[[], float] = random.random,
        access_lines: BufferedLines | None = None,
    ) -> None:
        self.metrics = metrics
        self.routes = routes
        self.own_identity = own_identity
        self.tracing = tracing
        self.tracer = tracing.tracer if tracing is not None else None
        self._request: type[_Request] = _Request
        if tracing is not None:
            from proxy.tracing import TracedRequest  # (only with tracing on: it imports OpenTelemetry)

            self._request = TracedRequest
        self.access_log = access_log
        self.access_log_sample = access_log_sample
        self.access_lines = access_lines  # None: access lines go through the logging module
        self.rand = rand
        self._identities: dict[str, str] = {}
        # (direction, source, destination, status, decision) as the request had them -> its series:
        # one lookup per request instead of two identity labels, a status class and a label tuple.
        self._series: dict[tuple[str, str | None, str | None, int | None, str, str], RequestSeries] = {}
        # Requests in flight: plain counts, read by the gauge when scraped (not a locked update twice
        # per request).
        self.in_flight = {"inbound": 0, "outbound": 0}
        for direction in self.in_flight:
            metrics.requests_active.labels(direction).set_function(self._count_of(direction))

    def _count_of(self, direction: str) -> Callable[[], float]:
        return lambda: self.in_flight[direction]

    def start(self, info: RequestInfo) -> RequestSpan:
        self.in_flight[info.direction] += 1
        return self._request(self, info)


class _Request:
    __slots__ = ("_debug", "_fmt", "_headers", "_sampled", "_started", "info", "observer", "span")

    def __init__(self, observer: ProxyObserver, info: RequestInfo) -> None:
        self.observer = observer
        self.info = info
        self._started = time.perf_counter()
        self._fmt: tuple[Format, ...] | None = None  # None: a new trace's formats
        self._debug = False  # B3's debug flag, to pass on
        self.span: Span | None = None  # the SDK's span, when the SDK decides sampling
        self._sampled: tuple[SpanContext, Context | None, int] | None = None  # a deferred span
        self._headers: list[tuple[bytes, bytes]] | None = None  # None: the trace headers go on unchanged

    def trace_headers(self) -> list[tuple[bytes, bytes]] | None:
        return self._headers

    def _end_trace(self, result: RequestResult, destination: str | None, outbound: bool) -> None:
        """Ends the request's span (proxy.tracing.TracedRequest; without tracing there is none)."""

    def finish(self, result: RequestResult) -> None:
        obs = self.observer
        info = self.info
        seconds = time.perf_counter() - self._started
        outbound = info.direction == "outbound"
        source = obs.own_identity if outbound else info.source
        destination = (result.destination or info.destination) if outbound else obs.own_identity
        status, code, decision = result.status, result.grpc_status, result.decision
        grpc = "" if code is None else grpc_status_label(code)  # bounded, as the key must be
        key = (info.direction, source, destination, status, decision, grpc)
        series = obs._series.get(key)
        if series is None:
            if len(obs._series) >= _MAX_IDENTITIES:
                obs._series.clear()
            ids = obs._identities
            labels = (
                info.direction,
                identity_label(source, ids),
                identity_label(destination, ids),
                status_class(result),
                result.decision,
                grpc,
            )
            series = obs._series[key] = obs.metrics.requests.of(labels)
        series.add(seconds)
        obs.in_flight[info.direction] -= 1
        denied = decision == "deny"  # counted in ..._denials_total where it is decided
        # (succeeded(result), without the call: most requests)
        ok = status is not None and status < 500 and code in (None, 0) and not denied and result.error is None
        obs.routes.record(info.direction, route_of(info.method, info.path), seconds, ok, denied)
        span = self.span
        sampled = self._sampled
        if span is not None or sampled is not None:
            self._end_trace(result, destination if outbound else None, outbound)
        if (
            obs.access_log
            and access.isEnabledFor(logging.INFO)
            and (not ok or obs.access_log_sample >= 1.0 or obs.rand() < obs.access_log_sample)
        ):
            ctx = sampled[0] if sampled is not None else span.get_span_context() if span is not None else None
            _log(info, result, source, destination, seconds, ctx, obs.access_lines)


def _log(
    info: RequestInfo,
    result: RequestResult,
    source: str | None,
    destination: str | None,
    seconds: float,
    trace: SpanContext | None,
    lines: BufferedLines | None,
) -> None:
    fields: dict[str, object] = {
        "direction": info.direction,
        "protocol": info.protocol,
        "method": info.method,
        "path": info.path.split("?", 1)[0],
        "authority": info.authority,
        "source": source,
        "destination": destination,
        "service": info.service,
        "peer": result.endpoint or info.peer_address,
        "decision": result.decision,
        "reason": result.reason,
        "policy": result.policy,
        "status": result.status,
        "grpc_status": result.grpc_status,
        "error": result.error,
        "retries": result.retries,
        "duration_ms": round(seconds * 1000, 3),
        "request_bytes": result.request_bytes,
        "response_bytes": result.response_bytes,
    }
    if trace is not None and trace.trace_flags.sampled:
        fields["trace_id"] = f"{trace.trace_id:032x}"
        fields["span_id"] = f"{trace.span_id:016x}"
    if lines is not None:
        lines.info("request", fields)
    else:
        access.info("request", extra=fields)
