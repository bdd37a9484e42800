"""The CA's Prometheus metrics, in a registry of their own (one per server instance)."""

from __future__ import annotations

from sidemesh.prometheus import CollectorRegistry, Counter, Gauge, Histogram


class CAMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.issued = Counter(
            "sidemesh_ca_certificates_issued", "Workload certificates issued.", registry=self.registry
        )
        self.refused = Counter(
            "sidemesh_ca_requests_refused",
            "Signing requests refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sidemesh_ca_sign_duration_seconds",
            "Time to answer a signing request, authentication included.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )
        self.signing_cert_expiry = Gauge(
            "sidemesh_ca_signing_certificate_expiry_timestamp_seconds",
            "notAfter of the CA's signing certificate, as a Unix time.",
            registry=self.registry,
        )
