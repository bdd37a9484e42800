"""End to end: HTTP requests from app A to app B through a real sidecar pair (mTLS, certificates
from our CA), with tracing on and a real OTLP receiver in the test.

One request gives a CLIENT span in A's sidecar and a SERVER span in B's sidecar in the trace the app
started, the server span a child of the client span, and app B sees a traceparent whose parent is
the server span. A denied request gives a span with the denial reason. The same requests show up in
/metrics, scraped over HTTP, and in `sidemesh top`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.sidecar import Sidecar
from sidemesh.top import run_top
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh
from tests.support.otlp import ReceivedSpan, Receiver

FRONTEND, CART = 1, 2
OUT = 18080
APP = 8080
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
A = "spiffe://cluster.local/ns/shop/sa/frontend"
B = "spiffe://cluster.local/ns/shop/sa/cart"

ALLOW_GET_CART = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-http, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080], http: {methods: [GET], paths: ["/cart/*"]}}
"""


class App:
    """App B: answers with the trace headers it received."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.raw: list[list[tuple[bytes, bytes]]] = []  # as on the wire, repeats and all
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.raw.append([(k.lower(), v) for k, v in request.raw_headers])
        return web.json_response({"path": request.path}, status=int(request.query.get("status", 200)))


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    yield r
    await r.stop()


@pytest.fixture
async def pair(start_ca: StartCA, tmp_path: Path, receiver: Receiver) -> AsyncIterator[tuple[Mesh, App]]:
    ca = await start_ca()
    mesh = new_mesh(ca, tmp_path, ALLOW_GET_CART)
    app = App()
    await app.runner.setup()
    await web.TCPSite(app.runner, mesh.addr(CART), APP).start()
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    yield mesh, app
    await mesh.close()
    await app.runner.cleanup()


def _get(host: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{host}:{OUT}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def get(mesh: Mesh, path: str, **headers: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, mesh.addr(FRONTEND), path, headers)


def by_kind(spans: list[ReceivedSpan], trace_id: str, kind: str) -> ReceivedSpan:
    found = [s for s in spans if s.trace_id == trace_id and s.kind == kind]
    assert len(found) == 1, spans
    return found[0]


async def test_one_request_one_trace_across_both_sidecars(pair: tuple[Mesh, App], receiver: Receiver) -> None:
    mesh, app = pair
    status, _ = await get(mesh, "/cart/items?id=7", traceparent=f"00-{TRACE}-{APP_SPAN}-01")
    assert status == 200
    spans = await receiver.wait_for(lambda s: sum(x.trace_id == TRACE for x in s) >= 2)
    client = by_kind(spans, TRACE, "CLIENT")
    server = by_kind(spans, TRACE, "SERVER")
    assert client.service == "frontend.shop" and server.service == "cart.shop"
    assert client.parent_id == APP_SPAN  # the app's own trace, continued
    assert server.parent_id == client.span_id
    seen = app.headers[-1]["traceparent"]
    assert seen.startswith(f"00-{TRACE}-{server.span_id}-")  # app B's parent: the server span
    for span in (client, server):
        assert span.attributes["sidemesh.source.id"] == A
        assert span.attributes["sidemesh.destination.id"] == B
        assert span.attributes["http.request.method"] == "GET"
        assert span.attributes["url.path"] == "/cart/items"
        assert span.attributes["http.response.status_code"] == 200
        assert span.status == "UNSET"
    assert server.attributes["sidemesh.authz.decision"] == "allow"
    assert server.attributes["sidemesh.authz.policy"] == "shop/cart-http"
    assert "network.peer.address" in client.attributes


async def test_a_request_without_trace_context_starts_one(pair: tuple[Mesh, App], receiver: Receiver) -> None:
    mesh, app = pair
    assert (await get(mesh, "/cart/new"))[0] == 200

    def both(spans: list[ReceivedSpan]) -> bool:
        traces = {x.trace_id for x in spans if x.service == "cart.shop"}
        return any(x.service == "frontend.shop" and x.trace_id in traces for x in spans)

    spans = await receiver.wait_for(both)
    server = next(s for s in spans if s.service == "cart.shop")
    client = by_kind(spans, server.trace_id, "CLIENT")
    assert client.parent_id == "" and server.parent_id == client.span_id
    assert app.headers[-1]["traceparent"].startswith(f"00-{server.trace_id}-{server.span_id}-")


async def _keepalive_get(mesh: Mesh, head: bytes) -> bytes:
    """One request with no Connection header (the sidecars' plain path: no hop-by-hop header to
    take out), the connection left open as HTTP/1.1 clients leave it."""
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        writer.write(head)
        status = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in status.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        return status
    finally:
        writer.close()


async def test_an_unsampled_callers_trace_headers_reach_the_app_as_sent(
    pair: tuple[Mesh, App], receiver: Receiver
) -> None:
    """The caller said "not sampled": neither sidecar records a span, and its traceparent and
    tracestate reach app B byte for byte, once each, on both header paths (with a Connection
    header, whose hop-by-hop headers are taken out, and without)."""
    mesh, app = pair
    parent = f"00-{TRACE}-{APP_SPAN}-00"
    status, _ = await get(mesh, "/cart/quiet", traceparent=parent, tracestate="vendor=a")
    assert status == 200
    head = (
        f"GET /cart/quiet HTTP/1.1\r\nHost: cart\r\ntraceparent: {parent}\r\ntracestate: vendor=a\r\n\r\n"
    ).encode()
    assert (await _keepalive_get(mesh, head)).startswith(b"HTTP/1.1 200")
    assert len(app.raw) == 2
    for seen in app.raw:
        trace = [(k, v) for k, v in seen if k in (b"traceparent", b"tracestate")]
        assert trace == [(b"traceparent", parent.encode()), (b"tracestate", b"vendor=a")], seen
    # Without trace headers, the client sidecar starts a trace: app B sees exactly one traceparent.
    assert (await _keepalive_get(mesh, b"GET /cart/new HTTP/1.1\r\nHost: cart\r\n\r\n")).startswith(
        b"HTTP/1.1 200"
    )
    assert len([v for k, v in app.raw[-1] if k == b"traceparent"]) == 1
    await asyncio.sleep(0.3)
    assert [s for s in receiver.spans if s.trace_id == TRACE] == []


async def test_b3_single_in_b3_out_to_the_app(pair: tuple[Mesh, App], receiver: Receiver) -> None:
    mesh, app = pair
    assert (await get(mesh, "/cart/b3", b3=f"{TRACE}-{APP_SPAN}-1"))[0] == 200
    spans = await receiver.wait_for(lambda s: sum(x.trace_id == TRACE for x in s) >= 2)
    server = by_kind(spans, TRACE, "SERVER")
    seen = app.headers[-1]
    assert seen["b3"].startswith(f"{TRACE}-{server.span_id}") and "traceparent" not in seen


async def test_a_denied_request_gets_a_span_with_the_reason(
    pair: tuple[Mesh, App], receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidemesh.proxy.access")
    mesh, app = pair
    status, _ = await get(mesh, "/admin/delete", traceparent=f"00-{TRACE}-{APP_SPAN}-01")
    assert status == 403 and app.headers == []
    spans = await receiver.wait_for(lambda s: sum(x.trace_id == TRACE for x in s) >= 2)
    server = by_kind(spans, TRACE, "SERVER")
    assert server.status == "UNSET"  # a 4xx is the caller's error (HTTP semantic conventions)
    assert server.attributes["sidemesh.authz.decision"] == "deny"
    assert "cart-http" in server.attributes["sidemesh.authz.reason"]
    assert server.attributes["http.response.status_code"] == 403
    client = by_kind(spans, TRACE, "CLIENT")
    assert server.parent_id == client.span_id
    assert client.status == "ERROR" and client.attributes["error.type"] == "403"
    denied = [
        r for r in caplog.records if r.getMessage() == "request" and r.__dict__.get("decision") == "deny"
    ]
    assert denied and denied[0].__dict__["trace_id"] == TRACE
    assert denied[0].__dict__["source"] == A and "cart-http" in denied[0].__dict__["reason"]


def _samples(sidecar: Sidecar) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://{sidecar.config.app_host}:{sidecar.ports['health']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_and_top_count_the_requests_sent(pair: tuple[Mesh, App], receiver: Receiver) -> None:
    mesh, _app = pair
    cart, frontend = mesh.sidecars["cart"], mesh.sidecars["frontend"]
    statuses = [200] * 5 + [503] * 2
    for status in statuses:
        assert (await get(mesh, f"/cart/s?status={status}"))[0] == status
    assert (await get(mesh, "/nope"))[0] == 403
    inn = await asyncio.to_thread(_samples, cart)
    out = await asyncio.to_thread(_samples, frontend)
    key = {"source": "shop/frontend", "destination": "shop/cart"}

    def requests(m: dict[Any, float], direction: str, klass: str, decision: str) -> float:
        labels = {
            **key,
            "direction": direction,
            "status_class": klass,
            "decision": decision,
            "grpc_status": "",
        }
        return m.get(("sidemesh_proxy_requests_total", frozenset(labels.items())), 0.0)

    assert requests(inn, "inbound", "2xx", "allow") == 5
    assert requests(inn, "inbound", "5xx", "allow") == 2
    assert requests(inn, "inbound", "4xx", "deny") == 1
    assert requests(out, "outbound", "2xx", "allow") == 5
    assert requests(out, "outbound", "5xx", "allow") == 2
    assert requests(out, "outbound", "4xx", "allow") == 1  # the caller's side sees a 403
    count = (
        "sidemesh_proxy_request_duration_seconds_count",
        frozenset({**key, "direction": "inbound", "status_class": "2xx"}.items()),
    )
    assert inn[count] == 5
    # sidemesh top over the cart's admin page, one interval while one more request is sent.
    admin = f"{mesh.addr(CART)}:{cart.ports['admin']}"
    text = io.StringIO()
    top = asyncio.create_task(asyncio.to_thread(run_top, [admin], 0.5, True, 10, "all", text))
    await asyncio.sleep(0.1)
    await get(mesh, "/cart/s")
    assert await top == 0
    rows = {" ".join(line.split()[1:3]): line.split() for line in text.getvalue().splitlines()[2:]}
    assert rows["GET /cart/s"][-1] == "8"  # all requests to the route so far (the query is not part of it)
    assert rows["GET /nope"][-2] == "0" and rows["GET /nope"][-1] == "1"
    assert not [r for r in rows if r.startswith("TCP")], rows  # HTTP connections count per request
