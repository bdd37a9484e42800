"""proxy.telemetry.ProxyObserver without tracing: the golden metrics and the access log per request."""

from __future__ import annotations

import io
import json
import logging
from typing import Literal

import pytest

from proxy.metrics import ProxyMetrics
from proxy.observe import RequestInfo, RequestResult
from proxy.routes import RouteStats
from proxy.telemetry import ProxyObserver
from sidemesh.logging import BufferedLines

ME = "spiffe://cluster.local/ns/shop/sa/frontend"
CART = "spiffe://cluster.local/ns/shop/sa/cart"


def info(direction: Literal["inbound", "outbound"]) -> RequestInfo:
    return RequestInfo(
        direction, "http/1.1", "GET", "/cart/1?x=1", "cart", [], source=CART, service="cart.shop:80"
    )


def active(metrics: ProxyMetrics, direction: Literal["inbound", "outbound"]) -> float | None:
    return metrics.registry.get_sample_value("sidemesh_proxy_requests_active", {"direction": direction})


def test_requests_in_flight_are_counted_per_direction_until_they_finish() -> None:
    metrics = ProxyMetrics()
    obs = ProxyObserver(metrics, RouteStats(), ME, access_log=False)
    outs = [obs.start(info("outbound")) for _ in range(3)]
    inbound = obs.start(info("inbound"))
    assert (active(metrics, "outbound"), active(metrics, "inbound")) == (3, 1)
    outs[0].finish(RequestResult(status=200))
    inbound.finish(RequestResult(status=None, error="reset"))
    assert (active(metrics, "outbound"), active(metrics, "inbound")) == (2, 0)
    for span in outs[1:]:
        span.finish(RequestResult(status=503))
    assert active(metrics, "outbound") == 0
    total = metrics.registry.get_sample_value(
        "sidemesh_proxy_requests_total",
        {
            "direction": "outbound",
            "source": "shop/frontend",
            "destination": "unknown",
            "status_class": "5xx",
            "decision": "allow",
            "grpc_status": "",
        },
    )
    assert total == 2


def test_access_log_lines_only_when_the_logger_takes_info(caplog: pytest.LogCaptureFixture) -> None:
    obs = ProxyObserver(ProxyMetrics(), RouteStats(), ME)
    with caplog.at_level(logging.WARNING, logger="sidemesh.proxy.access"):
        obs.start(info("inbound")).finish(RequestResult(status=200))
    assert not [r for r in caplog.records if r.name == "sidemesh.proxy.access"]
    with caplog.at_level(logging.INFO, logger="sidemesh.proxy.access"):
        obs.start(info("inbound")).finish(RequestResult(status=200))
    (line,) = [r for r in caplog.records if r.name == "sidemesh.proxy.access"]
    assert line.path == "/cart/1" and line.status == 200 and line.source == CART  # type: ignore[attr-defined]


async def test_batched_access_lines_only_when_the_logger_takes_info(caplog: pytest.LogCaptureFixture) -> None:
    """What `sidemesh proxy run` does: the same lines, written in batches (sidemesh/logging.py)."""
    stream = io.StringIO()
    lines = BufferedLines("sidemesh.proxy.access", stream)
    obs = ProxyObserver(ProxyMetrics(), RouteStats(), ME, access_lines=lines)
    with caplog.at_level(logging.WARNING, logger="sidemesh.proxy.access"):
        obs.start(info("inbound")).finish(RequestResult(status=200))
    lines.flush()
    assert stream.getvalue() == ""
    with caplog.at_level(logging.INFO, logger="sidemesh.proxy.access"):
        obs.start(info("inbound")).finish(RequestResult(status=503))
        assert stream.getvalue() == ""  # waiting for its batch
        lines.flush()  # as the drain does
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert (line["event"], line["path"], line["status"], line["source"]) == ("request", "/cart/1", 503, CART)
    assert not [r for r in caplog.records if r.name == "sidemesh.proxy.access"]  # not through logging too
