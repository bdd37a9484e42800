"""The sidecar's Prometheus metrics (bounded label values only), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "Bytes relayed on connections that closed, by direction (received from either side).",
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
            "--idle-timeout).",
            ["direction", "reason"],
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
        self.requests = Counter(
            "sidemesh_proxy_requests",
            "Requests answered, by direction, source and destination workload identity "
            "(namespace/serviceaccount), status class and authorization decision.",
            ["direction", "source", "destination", "status_class", "decision"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidemesh_proxy_request_duration_seconds",
            "From the request's headers to the end of its response, as this sidecar saw it.",
            ["direction", "source", "destination", "status_class"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.requests_active = Gauge(
            "sidemesh_proxy_requests_active", "Requests in flight, by direction.", ["direction"], registry=r
        )
