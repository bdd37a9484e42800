"""The sidecar's Prometheus metrics (bounded label values only), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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
            "Bytes relayed, by direction (received from the app or peer).",
            ["direction"],
            registry=r,
        )
        self.denials = Counter(
            "sidemesh_proxy_authorization_denials",
            "Inbound connections denied, by policy or default.",
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
