"""The sidecar's /metrics scraped over HTTP and parsed with prometheus_client's parser, checked
against the traffic the test sent."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import pool
from proxy import sidecar as sidecar_module
from proxy.observe import RequestInfo, RequestResult
from proxy.sidecar import Sidecar
from sidemesh.identity import tls
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import INBOUND, MESH_YAML, Mesh, new_mesh, talk
from tests.integration.test_http1 import CartApp
from tests.integration.test_http2 import channel, unary, unary_method
from tests.support.pipes import response_head

FRONTEND, CART, STRANGER = 1, 2, 3
OUT = 18080
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path)
    yield m
    await m.close()


async def scrape(sidecar: Sidecar) -> Samples:
    url = f"http://{sidecar.config.app_host}:{sidecar.ports['health']}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.headers["content-type"].startswith("text/plain")
            return str(resp.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def tls_without_a_certificate(host: str, port: int) -> None:
    """A TLS client offering the mesh's ALPN but no certificate: the handshake fails server-side."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols([tls.ALPN])
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="x")
    try:
        await reader.readexactly(1)
    finally:
        writer.close()


async def test_connection_metrics_match_the_traffic_sent(mesh: Mesh) -> None:
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    await mesh.sidecar("stranger", STRANGER, outbound=(f"{mesh.addr(STRANGER)}:{OUT}=cart.shop:80",))
    payloads = [b"\x01" + b"x" * n for n in (10, 1000, 50_000)]  # not HTTP: carried as TCP at once
    for payload in payloads:
        assert await talk(mesh.addr(FRONTEND), OUT, payload) == payload.upper() + b"BYE"
    with pytest.raises(ConnectionResetError):
        await talk(mesh.addr(STRANGER), OUT, b"let me in")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await tls_without_a_certificate(mesh.addr(CART), INBOUND)
    await asyncio.sleep(0.2)  # the last closes are counted

    sent = sum(len(p) for p in payloads)
    received = sum(len(p) + 3 for p in payloads)
    out, inn = await scrape(frontend), await scrape(cart)
    assert value(out, "sidemesh_proxy_connections_total", direction="outbound", decision="allow") == 3
    assert value(out, "sidemesh_proxy_connections_closed_total", direction="outbound", outcome="ok") == 3
    # The frontend's sidecar relays the app's bytes plus the reply (and a few bytes of framing).
    assert (
        sent + received
        <= value(out, "sidemesh_proxy_bytes_total", direction="outbound")
        <= sent + received + 3 * 64
    )
    assert value(out, "sidemesh_proxy_connection_duration_seconds_count", direction="outbound") == 3
    assert value(out, "sidemesh_proxy_connections_open", direction="outbound") == 0

    assert value(inn, "sidemesh_proxy_connections_total", direction="inbound", decision="allow") == 3
    assert value(inn, "sidemesh_proxy_authorization_denials_total", policy="shop/cart-allow-frontend") == 1
    assert total(inn, "sidemesh_proxy_tls_handshake_failures_total", direction="inbound") >= 1
    now = time.time()
    assert now + 600 < value(inn, "sidemesh_proxy_certificate_expiry_timestamp_seconds") < now + 2 * 86400
    version = cart.mesh_config().version
    assert value(inn, "sidemesh_proxy_config_info", version=version) == 1
    assert now - 60 < value(inn, "sidemesh_proxy_config_last_update_timestamp_seconds") <= now


async def test_request_metrics_have_bounded_labels_and_count_each_request(mesh: Mesh) -> None:
    """Drives the observer the way the HTTP path does; the series are read back over HTTP."""
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    frontend_id = "spiffe://cluster.local/ns/shop/sa/frontend"
    statuses = [200, 200, 201, 404, 503]
    for i, status in enumerate(statuses):
        info = RequestInfo("inbound", "http/1.1", "GET", f"/cart/{i}?q=1", "cart", [], source=frontend_id)
        cart.observer.start(info).finish(RequestResult(status, reason="shop/cart-allow-frontend rule 0"))
    denied = RequestInfo("inbound", "h2", "POST", "/admin", "cart", [], source="unauthenticated")
    cart.observer.start(denied).finish(RequestResult(403, decision="deny", reason="no rule", policy="shop/x"))
    m = await scrape(cart)
    base = {"direction": "inbound", "source": "shop/frontend", "destination": "shop/cart", "grpc_status": ""}
    assert value(m, "sidemesh_proxy_requests_total", **base, status_class="2xx", decision="allow") == 3
    assert value(m, "sidemesh_proxy_requests_total", **base, status_class="4xx", decision="allow") == 1
    assert value(m, "sidemesh_proxy_requests_total", **base, status_class="5xx", decision="allow") == 1
    assert (
        value(
            m,
            "sidemesh_proxy_requests_total",
            direction="inbound",
            source="unauthenticated",
            destination="shop/cart",
            status_class="4xx",
            decision="deny",
            grpc_status="",
        )
        == 1
    )
    assert total(m, "sidemesh_proxy_request_duration_seconds_count", direction="inbound") == 6
    assert value(m, "sidemesh_proxy_requests_active", direction="inbound") == 0
    # A failed gRPC call is an HTTP 200: its code is a label of its own (Istio's grpc_response_status).
    call = RequestInfo("inbound", "h2", "POST", "/shop.Cart/Get", "cart", [], source=frontend_id)
    for code in (0, 14, 14, 99):
        cart.observer.start(call).finish(
            RequestResult(200, grpc_status=code, reason="shop/cart-allow-frontend")
        )
    m = await scrape(cart)
    grpc = {**base, "status_class": "2xx", "decision": "allow"}
    assert value(m, "sidemesh_proxy_requests_total", **{**grpc, "grpc_status": "0"}) == 1
    assert value(m, "sidemesh_proxy_requests_total", **{**grpc, "grpc_status": "14"}) == 2
    assert value(m, "sidemesh_proxy_requests_total", **{**grpc, "grpc_status": "other"}) == 1  # not a code
    # No label carries a path or a pod name.
    for (name, labels), _ in m.items():
        if name.startswith("sidemesh_proxy_request"):
            assert not any("/cart/" in v or "cart-1" in v for _, v in labels), (name, labels)


async def test_a_sidecar_configured_from_files_has_no_controller_gauge_and_no_created_series(
    mesh: Mesh,
) -> None:
    """sidemesh_proxy_controller_connected read 0 ("serving the last-known-good configuration")
    in every sidecar configured from files: an alert on it fired for all of them. And no
    *_created series (prometheus-client wrote one more gauge family per counter)."""
    cart = await mesh.sidecar("cart", CART)
    info = RequestInfo("inbound", "http/1.1", "GET", "/", "cart", [], source="unauthenticated")
    cart.observer.start(info).finish(RequestResult(200))
    cart.metrics.connections.labels("inbound", "allow").inc()
    m = await scrape(cart)
    names = {name for name, _ in m}
    assert "sidemesh_proxy_controller_connected" not in names
    assert {"sidemesh_proxy_connections_total", "sidemesh_proxy_requests_total"} <= names  # a real scrape
    assert not [n for n in names if n.endswith("_created")], sorted(names)


AUDIT_ONLY_FRONTEND = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-audit, namespace: shop}
spec:
  mode: audit
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080]}
"""


class _Echo(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return request

        return grpc.unary_unary_rpc_method_handler(echo)  # type: ignore[arg-type]


async def test_audit_denials_of_http_requests_and_grpc_calls_are_counted(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """docs/policy.md: watch the audit denials go to zero before enforcing. They were counted for
    opaque TCP only: HTTP requests and gRPC calls that an audit policy would refuse went under
    decision="allow", and the metric said nothing was left to fix."""
    mesh = new_mesh(await start_ca(), tmp_path, allow=AUDIT_ONLY_FRONTEND)
    app = CartApp()
    await app.start(mesh.addr(CART), 8080)
    try:
        cart = await mesh.sidecar("cart", CART, default_policy="allow-authenticated")
        stranger_out = f"{mesh.addr(STRANGER)}:{OUT}"
        await mesh.sidecar("stranger", STRANGER, outbound=(f"{stranger_out}=cart.shop:80",))
        for _ in range(3):
            with await asyncio.to_thread(
                urllib.request.urlopen, f"http://{stranger_out}/cart/x", timeout=5
            ) as r:
                assert r.status == 200  # audit mode: let through
        m = await scrape(cart)
        await app.runner.cleanup()
        audited = {"direction": "inbound", "source": "shop/stranger", "destination": "shop/cart"}
        series = {**audited, "status_class": "2xx", "grpc_status": ""}
        assert value(m, "sidemesh_proxy_requests_total", **series, decision="audit_deny") == 3
        assert value(m, "sidemesh_proxy_requests_total", **series, decision="allow") == 0
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_Echo(),))
        server.add_insecure_port(f"{mesh.addr(CART)}:8080")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(stranger_out) as channel:
                call = channel.unary_unary("/shop.Cart/Echo")
                assert await call(b"hi", timeout=5) == b"hi"
        finally:
            await server.stop(None)
        m = await scrape(cart)
        series = {**audited, "status_class": "2xx", "grpc_status": "0"}
        assert value(m, "sidemesh_proxy_requests_total", **series, decision="audit_deny") == 1
        # The app gone: the sidecar answers 502 itself, and the request is still an audit denial.
        with pytest.raises(urllib.error.HTTPError) as gone:
            await asyncio.to_thread(urllib.request.urlopen, f"http://{stranger_out}/cart/x", timeout=5)
        assert gone.value.code == 502
        gone.value.close()  # (it holds the response's socket: left to the collector, a ResourceWarning)
        async with grpc.aio.insecure_channel(stranger_out) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/shop.Cart/Echo")(b"hi", timeout=5)
        m = await scrape(cart)
        series = {**audited, "status_class": "5xx", "grpc_status": ""}
        assert value(m, "sidemesh_proxy_requests_total", **series, decision="audit_deny") == 1
        assert total(m, "sidemesh_proxy_requests_total", direction="inbound", decision="allow") == 0
    finally:
        await app.runner.cleanup()
        await mesh.close()


def _post(host: str, port: int, body: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        head = b"POST /cart/echo HTTP/1.1\r\nHost: cart\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        s.sendall(head % len(body) + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_bytes_of_open_connections_are_counted_as_they_flow(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bytes_total grows while a connection is open (every few seconds, as Istio reports TCP bytes):
    a long-lived TCP connection, and the pooled connection HTTP requests ride, counted nothing
    until they closed (hours later for a WebSocket or a busy pool)."""
    monkeypatch.setattr(sidecar_module, "HEAP_TRIM_SECONDS", 0.1)
    await mesh.app(CART)
    cart = await mesh.sidecar("cart", CART)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        payload = b"\x01" + b"x" * 5000  # not HTTP: carried as TCP
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload.upper()
        await asyncio.sleep(0.4)
        out, inn = await scrape(frontend), await scrape(cart)
        assert value(out, "sidemesh_proxy_connections_open", direction="outbound") == 1
        assert value(out, "sidemesh_proxy_bytes_total", direction="outbound") >= 2 * len(payload)
        assert value(inn, "sidemesh_proxy_bytes_total", direction="inbound") >= 2 * len(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"BYE"
    finally:
        writer.close()
    await asyncio.sleep(0.3)
    out = await scrape(frontend)  # counted once: the close adds only what came after the last report
    assert (
        2 * len(payload) + 3
        <= value(out, "sidemesh_proxy_bytes_total", direction="outbound")
        <= (2 * len(payload) + 3 + 64)
    )


async def test_http_connections_are_counted_once_each_with_their_bytes(mesh: Mesh) -> None:
    """Each HTTP connection the app opened is one allowed connection, closed once; the pool's own
    dials are not connections of their own, and what they carried is in bytes_total. (An HTTP
    connection counted nothing in bytes_total, and the pool's dials were the connections: 1 total
    and 5 closed after 5 requests, total - closed negative.)"""
    app = CartApp()
    await app.start(mesh.addr(CART), 8080)
    try:
        cart = await mesh.sidecar("cart", CART)
        out = f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80"
        frontend = await mesh.sidecar("frontend", FRONTEND, outbound=(out,))
        received = 0
        for _ in range(5):
            reply = await asyncio.to_thread(_post, mesh.addr(FRONTEND), OUT, b"x" * 1000)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
            received += len(reply)
        await asyncio.sleep(0.2)
        m = await scrape(frontend)  # five connections from the app, each closed after its request
        conns = value(m, "sidemesh_proxy_connections_total", direction="outbound", decision="allow")
        assert (conns, total(m, "sidemesh_proxy_connections_closed_total", direction="outbound")) == (5, 5)
        assert value(m, "sidemesh_proxy_bytes_total", direction="outbound") >= 5 * 1000  # their requests
        m = await scrape(cart)  # one connection from the frontend's sidecar, pooled, still open
        assert value(m, "sidemesh_proxy_connections_total", direction="inbound", decision="allow") == 1
        assert value(m, "sidemesh_proxy_connections_open", direction="inbound") == 1
        frontend.report_bytes()  # (every few seconds) what came back on the open pooled connection
        m = await scrape(frontend)
        assert value(m, "sidemesh_proxy_bytes_total", direction="outbound") >= 5 * 1000 + received
        before = value(m, "sidemesh_proxy_bytes_total", direction="outbound")
        pool.close_pools(frontend)  # its pooled connection to cart ends: nothing is counted twice
        await asyncio.sleep(0.2)
        m = await scrape(frontend)
        assert value(m, "sidemesh_proxy_bytes_total", direction="outbound") - before < 64
        assert value(m, "sidemesh_proxy_connections_total", direction="outbound", decision="allow") == 5
    finally:
        await app.runner.cleanup()


async def test_http_relayed_as_opaque_bytes_is_a_tcp_route(start_ca: StartCA, tmp_path: Path) -> None:
    """gRPC to pods without a sidecar goes as bytes (no HTTP/2 between sidecars to carry it): it is
    a TCP route in /stats/routes (`sidemesh top`). It was in no route at all, as it was detected h2."""
    plain_cart = MESH_YAML.replace("address: {net}.2, ports", "meshed: false, address: {net}.2, ports")
    assert plain_cart != MESH_YAML
    mesh = new_mesh(await start_ca(), tmp_path, workloads=plain_cart)
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{mesh.addr(CART)}:8080")
    await server.start()
    try:
        frontend = await mesh.sidecar(
            "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
        )
        async with channel((mesh.addr(FRONTEND), OUT)) as ch:
            assert await unary_method(ch, "/test.Echo/Unary")(b"ab") == b"ba"
        await asyncio.sleep(0.2)
        routes = frontend.routes.snapshot()["routes"]
        assert [(r["route"], r["requests"]) for r in routes] == [("TCP cart.shop:80", 1)]
    finally:
        await server.stop(0)
        await mesh.close()


async def test_a_request_target_the_sidecar_refuses_is_counted_as_its_400(mesh: Mesh) -> None:
    """The enforcing sidecar answers a path it cannot normalize itself (the app never sees it): that
    400 was in no metric and no route on that side."""
    app = CartApp()
    await app.start(mesh.addr(CART), 8080)
    try:
        cart = await mesh.sidecar("cart", CART)
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        with socket.create_connection((mesh.addr(FRONTEND), OUT), timeout=5) as s:
            s.sendall(b"GET /cart/%zz HTTP/1.1\r\nHost: cart\r\n\r\n")
            assert (await asyncio.to_thread(s.recv, 65536)).startswith(b"HTTP/1.1 400")
        await asyncio.sleep(0.2)
        m = await scrape(cart)
        assert total(m, "sidemesh_proxy_requests_total", direction="inbound", status_class="4xx") == 1
        # refused before any policy was asked: not an "allow" (no policy let it through)
        assert total(m, "sidemesh_proxy_requests_total", direction="inbound", decision="refused") == 1
        assert total(m, "sidemesh_proxy_requests_total", direction="inbound", decision="allow") == 0
        assert [r["route"] for r in cart.routes.snapshot()["routes"]] == ["GET /cart/%zz"]
        assert app.seen == []
    finally:
        await app.runner.cleanup()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: cart\r\nNo colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: cart\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
    ids=["unparsable", "too-large"],
)
async def test_a_request_head_refused_before_it_was_parsed_is_counted(
    mesh: Mesh, head: bytes, status: int
) -> None:
    """A head the sidecar cannot parse is answered by it (400, 431) and is a request in the metrics,
    the access log and the routes, as Envoy counts a downstream protocol error; it was in none
    (only the connection was counted)."""
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    with socket.create_connection((mesh.addr(FRONTEND), OUT), timeout=5) as s:
        s.sendall(head)
        assert (await asyncio.to_thread(s.recv, 65536)).startswith(b"HTTP/1.1 %d" % status)
    await asyncio.sleep(0.2)
    m = await scrape(frontend)
    series = {"direction": "outbound", "status_class": "4xx", "decision": "refused"}
    assert total(m, "sidemesh_proxy_requests_total", **series) == 1
    assert total(m, "sidemesh_proxy_requests_total", decision="allow") == 0
    assert [(r["route"], r["requests"]) for r in frontend.routes.snapshot()["routes"]] == [
        ("(bad request head)", 1)
    ]


async def test_a_malformed_http2_request_is_counted_as_refused_not_denied(mesh: Mesh) -> None:
    """An HTTP/2 request the sidecar refuses as malformed (before any policy) was labelled
    decision="deny", as if a policy had denied it."""
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":scheme", "http"), (":authority", "cart"), (":path", "no-slash")],
        end_stream=True,
    )
    writer.write(conn.data_to_send())
    try:
        status = (await response_head(reader, writer, conn))[b":status"]
    finally:
        writer.close()
    assert status == b"400"
    await asyncio.sleep(0.2)
    m = await scrape(frontend)
    assert total(m, "sidemesh_proxy_requests_total", direction="outbound", decision="refused") == 1
    assert total(m, "sidemesh_proxy_requests_total", decision="deny") == 0
