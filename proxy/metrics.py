"""The sidecar's Prometheus metrics (bounded label values only), in a registry of their own."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from sidemesh.prometheus import (
    Collector,
    CollectorRegistry,
    Counter,
    CounterMetricFamily,
    Gauge,
    Histogram,
    HistogramMetricFamily,
    Metric,
    floatToGoString,
)

# Seconds; request latencies in a mesh are mostly 1-100 ms.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONNECTION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "sidemesh_proxy_connections",
            "Connections handled, by direction and decision.",
            ["direction", "decision"],
            registry=r,
        )
        self.open = Gauge(
            "sidemesh_proxy_connections_open", "Connections open now.", ["direction"], registry=r
        )
        self.bytes = Counter(
            "sidemesh_proxy_bytes",
            "Bytes relayed, by direction (received from either side; reported every 5 s while a connection is open, and when it closes).",
            ["direction"],
            registry=r,
        )
        self.denials = Counter(
            "sidemesh_proxy_authorization_denials",
            "Inbound connections and HTTP requests denied, by policy (namespace/name) or 'default'.",
            ["policy"],
            registry=r,
        )
        self.tls_failures = Counter(
            "sidemesh_proxy_tls_handshake_failures",
            "TLS handshakes that failed.",
            ["direction", "reason"],
            registry=r,
        )
        self.cert_expiry = Gauge(
            "sidemesh_proxy_certificate_expiry_timestamp_seconds", "notAfter of the current SVID.", registry=r
        )
        self.config_version = Gauge(
            "sidemesh_proxy_config_info",
            "The configuration version in use (value 1).",
            ["version"],
            registry=r,
        )
        self.controller_connected = Gauge(
            "sidemesh_proxy_controller_connected",
            "1 while the config stream is up; 0: serving the last-known-good configuration.",
            registry=r,
        )
        self.config_age = Gauge(
            "sidemesh_proxy_config_last_update_timestamp_seconds",
            "When the configuration last changed.",
            registry=r,
        )
        self.closed = Counter(
            "sidemesh_proxy_connections_closed",
            "Connections closed, by direction and outcome (ok: both sides closed; error: reset, "
            "timeout or refused).",
            ["direction", "outcome"],
            registry=r,
        )
        self.timed_out = Counter(
            "sidemesh_proxy_connections_timed_out",
            "Connections the sidecar closed on a timer, by direction and reason (undecided: protocol "
            "detection timed out and the destination sent nothing within --undecided-timeout; idle: "
            "--idle-timeout, this sidecar's or the other's; head: an HTTP/1.1 request head not whole "
            "within --request-head-timeout).",
            ["direction", "reason"],
            registry=r,
        )
        self.flush_cuts = Counter(
            "sidemesh_proxy_flush_cuts",
            "Connections already closed whose peer took none of what was left to send for 60 s, "
            "then reset with bytes still unsent.",
            registry=r,
        )
        self.connection_duration = Histogram(
            "sidemesh_proxy_connection_duration_seconds",
            "How long connections stayed open, by direction.",
            ["direction"],
            buckets=CONNECTION_BUCKETS,
            registry=r,
        )
        # -- per request (HTTP/1.1, HTTP/2, gRPC), from proxy/telemetry.py ------------------------
        self.requests = RequestMetrics()
        r.register(self.requests)
        self.requests_active = Gauge(
            "sidemesh_proxy_requests_active", "Requests in flight, by direction.", ["direction"], registry=r
        )


# grpc_status: a gRPC call's status code ("0" OK .. "16"; "" for plain HTTP), as Istio's
# grpc_response_status: a failed call is an HTTP 200, so status_class alone counts it a success.
REQUEST_LABELS = ("direction", "source", "destination", "status_class", "decision", "grpc_status")
_LE = [floatToGoString(b) for b in REQUEST_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


class RequestSeries:
    """One series of requests (``REQUEST_LABELS``): plain numbers that the request path adds to."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)  # not cumulative; the last is +Inf

    def add(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect_left(REQUEST_BUCKETS, seconds)] += 1  # le: the first bound >= seconds


class RequestMetrics(Collector):
    """``sidemesh_proxy_requests_total`` (by ``REQUEST_LABELS``) and
    ``sidemesh_proxy_request_duration_seconds`` (the same without the decision), the same metrics a
    prometheus-client Counter and Histogram would expose, counted in plain numbers by the event
    loop's thread and turned into metric families when scraped. The client's own types take a lock
    and check their state on every update: ~1 us of a sidecar's CPU per request."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, ...], RequestSeries] = {}

    def of(self, labels: tuple[str, str, str, str, str, str]) -> RequestSeries:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = RequestSeries()
        return series

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, duration = self._families()
        histograms: dict[tuple[str, ...], tuple[list[int], float]] = {}
        for labels, s in list(self.series.items()):
            requests.add_metric(labels, s.count)
            seen = histograms.get(labels[:4])
            if seen is None:
                histograms[labels[:4]] = (list(s.buckets), s.sum)
            else:
                histograms[labels[:4]] = (
                    [a + b for a, b in zip(seen[0], s.buckets, strict=True)],
                    seen[1] + s.sum,
                )
        for labels, (buckets, total) in histograms.items():
            cumulative, running = [], 0
            for le, n in zip(_LE, buckets, strict=True):
                running += n
                cumulative.append((le, float(running)))
            duration.add_metric(labels, cumulative, total)
        yield requests
        yield duration

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "sidemesh_proxy_requests",
                "Requests answered, by direction, source and destination workload identity "
                "(namespace/serviceaccount), status class and authorization decision.",
                labels=REQUEST_LABELS,
            ),
            HistogramMetricFamily(
                "sidemesh_proxy_request_duration_seconds",
                "From the request's headers to the end of its response, as this sidecar saw it.",
                labels=REQUEST_LABELS[:4],
            ),
        )
