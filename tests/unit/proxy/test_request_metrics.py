"""The per-request metrics are counted in plain numbers (proxy/metrics.py RequestMetrics): what a
scrape shows must be what prometheus-client's own Counter and Histogram show for the same requests."""

from __future__ import annotations

import random

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import REQUEST_BUCKETS, REQUEST_LABELS, ProxyMetrics
from sidemesh.prometheus import (  # (prometheus-client's, our copy)
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
)


def _samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in families
        if fam.name.startswith("sidemesh_proxy_request")
        for s in fam.samples
        if not s.name.endswith("_created")
    }


def test_a_scrape_matches_prometheus_clients_counter_and_histogram() -> None:
    reference = CollectorRegistry()
    counter = Counter("sidemesh_proxy_requests", "r", REQUEST_LABELS, registry=reference)
    histogram = Histogram(
        "sidemesh_proxy_request_duration_seconds",
        "d",
        REQUEST_LABELS[:4],
        buckets=REQUEST_BUCKETS,
        registry=reference,
    )
    ours = ProxyMetrics()
    rand = random.Random(7)
    # Bucket bounds themselves (le is inclusive), past the last bound, and values in between.
    durations = [*REQUEST_BUCKETS, 0.0, 31.0, 1e-9]
    for _ in range(3000):
        labels = (
            rand.choice(["inbound", "outbound"]),
            "shop/frontend",
            rand.choice(["shop/cart", "other"]),
            rand.choice(["2xx", "5xx"]),
            rand.choice(["allow", "deny"]),
            rand.choice(["", "0", "14"]),
        )
        seconds = rand.choice([*durations, rand.random() * 40])
        counter.labels(*labels).inc()
        histogram.labels(*labels[:4]).observe(seconds)
        ours.requests.of(labels).add(seconds)
    expected = _samples(list(reference.collect()))
    scraped = list(text_string_to_metric_families(generate_latest(ours.registry).decode()))
    assert _samples(scraped) == pytest.approx(expected)  # sums add in another order
    # No *_created series (sidemesh.prometheus), in ours as in the client's own.
    assert not [s for f in scraped for s in f.samples if s.name.endswith("_created")]
    assert not [s for f in reference.collect() for s in f.samples if s.name.endswith("_created")]
    types = {f.name: f.type for f in scraped}
    assert types["sidemesh_proxy_requests"] == "counter"
    assert types["sidemesh_proxy_request_duration_seconds"] == "histogram"
