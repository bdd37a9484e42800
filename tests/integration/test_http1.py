"""HTTP/1.1 through a sidecar pair (frontend -> cart), compared with the direct connection: real
clients (http.client, aiohttp, raw sockets for what clients hide), a real aiohttp server, real mTLS
with certificates from our CA. Per-request authorization on one connection; keep-alive, pipelining,
chunked and large bodies, 100-continue, HEAD/204/304, WebSocket, malformed requests."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy import pool
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import ALLOW_FRONTEND, MESH_YAML, Mesh, new_mesh

FRONTEND, CART = 1, 2
OUT = 18080  # the frontend's local outbound port for cart.shop:80
APP = 8080

ALLOW_CART_PATHS = """\
apiVersion: sidemesh.io/v1alpha1
kind: ServiceAuthorization
metadata: {name: cart-http, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules:
  - from: [{serviceAccount: frontend}]
    to: {ports: [8080], http: {methods: [GET, POST, HEAD], paths: ["/cart/*"]}}
"""


class CartApp:
    """The app behind cart's sidecar: it records what reached it."""

    def __init__(self, keepalive_timeout: float = 75.0) -> None:
        self.seen: list[str] = []
        self.peers: set[str] = set()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/cart/echo", self.echo)
        app.router.add_get("/cart/ws", self.ws)
        app.router.add_get("/cart/status/{code}", self.status)
        app.router.add_get("/cart/fake-switch", self.fake_switch)
        app.router.add_get("/cart/firehose", self.firehose)
        self.firehose_sent = 0
        app.router.add_route("*", "/{tail:.*}", self.info)
        self.app = app
        self.runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout)

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    def _record(self, request: web.Request) -> None:
        self.seen.append(f"{request.method} {request.path_qs}")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.add(str(peer))

    async def info(self, request: web.Request) -> web.Response:
        self._record(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "body": len(body),
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        )

    async def echo(self, request: web.Request) -> web.StreamResponse:
        """Streams the body back as it comes (chunked), never holding all of it."""
        self._record(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def firehose(self, request: web.Request) -> web.StreamResponse:
        """Up to 1 GB as fast as the connection takes it, counting what it managed to send."""
        resp = web.StreamResponse()
        resp.content_length = 1 << 30
        await resp.prepare(request)
        chunk = b"x" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(1 << 10):
                await resp.write(chunk)  # waits while the transport's buffer is full
                self.firehose_sent += len(chunk)
        return resp

    async def status(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(status=int(request.match_info["code"]))

    async def fake_switch(self, request: web.Request) -> web.Response:
        """A 101 that names websocket but answers no key, then goes on speaking HTTP."""
        self._record(request)
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Accept": "bm90IHRoZSBhbnN3ZXI=",
        }
        return web.Response(status=101, headers=headers)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str(msg.data.upper())
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path, ALLOW_CART_PATHS)
    yield m
    await m.close()


@pytest.fixture
async def cart_app(mesh: Mesh) -> AsyncIterator[CartApp]:
    app = CartApp()
    await app.start(mesh.addr(CART), APP)
    yield app
    await app.runner.cleanup()


@pytest.fixture
async def pair(mesh: Mesh, cart_app: CartApp) -> tuple[str, int]:
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    return mesh.addr(FRONTEND), OUT


@contextlib.asynccontextmanager
async def raw_app_pair(
    mesh: Mesh, app: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[tuple[str, int]]:
    """A hand-written app (bytes the tests choose, HTTP libraries would not send) behind the cart
    sidecar; yields the frontend's outbound address for it."""
    server = await asyncio.start_server(app, mesh.addr(CART), APP)
    try:
        await mesh.sidecar("cart", CART)
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        yield mesh.addr(FRONTEND), OUT
    finally:
        server.close()
        await server.wait_closed()


def both(mesh: Mesh) -> list[tuple[str, int]]:
    """The direct connection, then the mesh: every scenario must behave the same on both."""
    return [(mesh.addr(CART), APP), (mesh.addr(FRONTEND), OUT)]


async def exchange(addr: tuple[str, int], payload: bytes, until: bytes | None = None) -> bytes:
    """Raw bytes in, raw bytes out (until EOF, or until ``until`` has been seen)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(payload)
        await writer.drain()
        if until is None:
            return await asyncio.wait_for(reader.read(), 10)
        data = b""
        while until not in data:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        writer.close()


def _keepalive_session(
    host: str, port: int, requests: list[tuple[str, str]]
) -> list[tuple[int, dict[str, str], bytes]]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    out = []
    for method, path in requests:
        conn.request(method, path, body=b"x" * 10 if method == "POST" else None)
        resp = conn.getresponse()
        out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
    conn.close()
    return out


async def test_per_request_authorization_on_one_keepalive_connection(
    pair: tuple[str, int], cart_app: CartApp, mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    requests = [
        ("GET", "/cart/1"),
        ("GET", "/admin?access_token=secret"),
        ("POST", "/cart/2"),
        ("DELETE", "/cart/3"),
        ("GET", "/cart/4?q=1"),
    ]
    results = await asyncio.to_thread(_keepalive_session, *pair, requests)
    assert [r[0] for r in results] == [200, 403, 200, 403, 200]
    denied = results[1][1]
    assert "sidemesh-denied-reason" in denied
    assert denied["sidemesh-denied-reason"] in results[1][2].decode()
    assert cart_app.seen == ["GET /cart/1", "POST /cart/2", "GET /cart/4?q=1"]  # denied ones never reached it
    assert json.loads(results[2][2])["body"] == 10
    assert len(cart_app.peers) == 1  # one pooled keep-alive connection from cart's sidecar to the app
    # One mTLS connection between the sidecars, one connection to the app: no handshake per request.
    assert pool.pool_of(mesh.sidecars["frontend"]).opened == 1
    assert pool.pool_of(mesh.sidecars["cart"]).opened == 1
    # The denial is logged with the path, not its query (which may carry credentials, as the
    # access log and spans leave it out)
    logged = [r.__dict__ for r in caplog.records if r.getMessage() == "request denied"]
    assert sorted(r["path"] for r in logged) == ["/admin", "/cart/3"], logged
    assert "secret" not in caplog.text


async def test_a_policy_change_applies_to_the_next_request_on_an_open_connection(
    pair: tuple[str, int], cart_app: CartApp, mesh: Mesh
) -> None:
    """Decisions are kept per connection for repeated requests, but only under the configuration
    they were taken with."""
    reader, writer = await asyncio.open_connection(*pair)

    async def get(path: str) -> bytes:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: cart\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        return head

    try:
        for _ in range(3):
            assert (await get("/cart/1")).startswith(b"HTTP/1.1 200 ")
        mesh.write("allow.yaml", ALLOW_CART_PATHS.replace('"/cart/*"', '"/basket/*"'))
        assert mesh.sidecars["cart"].reload_config()
        assert (await get("/cart/1")).startswith(b"HTTP/1.1 403 ")
        assert not (await get("/basket/1")).startswith(b"HTTP/1.1 403 ")  # allowed (the app says 404)
        assert cart_app.seen.count("GET /cart/1") == 3
    finally:
        writer.close()


@pytest.mark.parametrize("target", ["/cart/../admin", "/cart/%2e%2e/admin", "/cart/x/..%2F..%2F../admin"])
async def test_dot_segments_cannot_escape_an_allowed_prefix(
    pair: tuple[str, int], cart_app: CartApp, target: str
) -> None:
    raw = await exchange(pair, f"GET {target} HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 403") or raw.startswith(b"HTTP/1.1 200"), raw[:100]
    if raw.startswith(b"HTTP/1.1 200"):  # still under /cart/ once normalized: the app saw that path
        assert all(seen.startswith("GET /cart/") for seen in cart_app.seen), cart_app.seen
    else:
        assert cart_app.seen == []


async def test_the_app_gets_the_normalized_path_the_policy_saw(
    pair: tuple[str, int], cart_app: CartApp
) -> None:
    raw = await exchange(
        pair, b"GET /cart/./a/../b?q=/../z HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
    assert cart_app.seen == ["GET /cart/b?q=/../z"]
    bad = await exchange(pair, b"GET /cart/%zz HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400") and b"percent-encoding" in bad
    assert cart_app.seen == ["GET /cart/b?q=/../z"]


async def test_hop_by_hop_headers_are_not_forwarded(pair: tuple[str, int]) -> None:
    req = (
        b"GET /cart/h HTTP/1.1\r\nHost: cart\r\nConnection: keep-alive, x-private\r\n"
        b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Public: yes\r\nConnection: close\r\n\r\n"
    )
    raw = await exchange(pair, req)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    seen = json.loads(body)["headers"]
    assert seen["x-public"] == "yes"
    assert "x-private" not in seen and "keep-alive" not in seen


SPOOFED = (
    b"X-Forwarded-Client-Cert: By=spiffe://cluster.local/ns/shop/sa/cart;URI=spiffe://cluster.local/ns/shop/sa/admin\r\n"
    b"l5d-client-id: admin.shop.serviceaccount.identity.linkerd.cluster.local\r\n"
)


async def test_only_the_sidecar_tells_the_app_who_called(mesh: Mesh, cart_app: CartApp) -> None:
    """Identity headers a caller sends (Envoy's XFCC, Linkerd's l5d-client-id) never reach the app:
    an app moved from Istio or Linkerd trusts them. An mTLS caller's identity is set in XFCC as
    Envoy's SANITIZE_SET writes it; a plaintext caller (permissive mode) gets none."""
    mesh.write(
        "allow.yaml", ALLOW_CART_PATHS + "  - from: [{unauthenticated: true}]\n    to: {ports: [8080]}\n"
    )
    await mesh.sidecar("cart", CART, mode="permissive")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    cart_id, frontend_id = (
        "spiffe://cluster.local/ns/shop/sa/cart",
        "spiffe://cluster.local/ns/shop/sa/frontend",
    )
    for addr, expected in (
        ((mesh.addr(FRONTEND), OUT), f"By={cart_id};URI={frontend_id}"),  # through the pair: mTLS
        ((mesh.addr(CART), 15006), None),  # straight at cart's sidecar: plaintext
    ):
        reader, writer = await asyncio.open_connection(*addr)
        try:
            # keep-alive: with, without, other case, underscores (x_forwarded_client_cert is
            # HTTP_X_FORWARDED_CLIENT_CERT to WSGI, PHP and Rack, joined with the sidecar's)
            for extra in (SPOOFED, b"", SPOOFED.upper(), SPOOFED.replace(b"-", b"_")):
                writer.write(b"GET /cart/who HTTP/1.1\r\nHost: cart\r\n" + extra + b"\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                seen = json.loads(await reader.readexactly(length))["headers"]
                assert seen.get("x-forwarded-client-cert") == expected, (addr, extra, seen)
                assert not {"l5d-client-id", "x_forwarded_client_cert", "l5d_client_id"} & set(seen), seen
        finally:
            writer.close()


@pytest.mark.parametrize(
    "line",
    [
        b"\r\nGET /cart/who HTTP/1.1\r\n",  # an empty line first (RFC 9112 2.2)
        b"GET  /cart/who  HTTP/1.1\r\n",  # runs of spaces, as llhttp and most servers take them
    ],
)
async def test_request_lines_of_any_accepted_shape_are_parsed(
    mesh: Mesh, cart_app: CartApp, line: bytes
) -> None:
    """Detection wanted one space between the parts and the whole line in 8 KiB: any other shape a
    server accepts was carried as opaque, unparsed, and the app was told the caller's own XFCC."""
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        writer.write(line + b"Host: cart\r\n" + SPOOFED + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        seen = json.loads(await reader.readexactly(length))["headers"]
        assert seen.get("x-forwarded-client-cert") == (
            "By=spiffe://cluster.local/ns/shop/sa/cart;URI=spiffe://cluster.local/ns/shop/sa/frontend"
        )
        assert "l5d-client-id" not in seen
    finally:
        writer.close()


# A second Service in front of the cart, declaring its port opaque.
CART_RAW = (
    "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: cart-raw\n  namespace: shop\n"
    '  annotations: {sidemesh.io/opaque-ports: "81"}\n'
    "spec: {selector: {app: cart}, ports: [{name: tcp, port: 81, targetPort: 8080}]}\n"
)


async def test_a_service_marked_opaque_is_opaque_for_the_callee_too(mesh: Mesh, cart_app: CartApp) -> None:
    """Two Services in front of the cart: `cart-raw` marks its port opaque, `cart` does not. Through
    `cart-raw` the caller does not look and says nothing; the callee carries it as declared (it was
    refused as HTTP said to be opaque, or waited for a detection). Through `cart` the caller parsed
    HTTP: the callee parses it too (a port made opaque by one Service made it opaque for all)."""
    mesh.write(
        "workloads.yaml",
        MESH_YAML.format(net=mesh.net) + CART_RAW,
    )
    mesh.write("allow.yaml", ALLOW_FRONTEND)
    cart = await mesh.sidecar("cart", CART)
    assert 8080 in cart.mesh_config().service_opaque_ports and 8080 not in cart.mesh_config().opaque_ports
    outbound = (
        f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",
        f"{mesh.addr(FRONTEND)}:{OUT + 1}=cart-raw.shop:81",
    )
    await mesh.sidecar("frontend", FRONTEND, outbound=outbound)
    for port, xfcc in ((OUT + 1, None), (OUT, "URI=spiffe://cluster.local/ns/shop/sa/frontend")):
        reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), port)
        try:
            started = time.monotonic()
            writer.write(b"GET /cart/who HTTP/1.1\r\nHost: cart\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 0.5, head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen = json.loads(await reader.readexactly(length))["headers"]
            assert (seen.get("x-forwarded-client-cert") or "").endswith(xfcc or ""), seen
            assert xfcc is not None or "x-forwarded-client-cert" not in seen, seen
        finally:
            writer.close()


async def test_an_h2c_upgrade_is_not_passed_on(pair: tuple[str, int], cart_app: CartApp) -> None:
    """Only WebSocket upgrades cross the mesh (as Istio configures Envoy). Passed on, an app that
    speaks h2c would answer 101 and the spliced connection would carry HTTP/2 requests that no
    per-request policy sees (h2c smuggling). The request is answered as plain HTTP/1.1 instead,
    and what follows it on the connection is still parsed and authorized as HTTP/1.1."""
    req = (
        b"GET /cart/up HTTP/1.1\r\nHost: cart\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    raw = await exchange(pair, req)
    assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"200", b"403"], raw
    seen = json.loads(raw.split(b"\r\n\r\n")[1].split(b"HTTP/1.1")[0])["headers"]
    assert "upgrade" not in seen and "http2-settings" not in seen, seen
    assert cart_app.seen == ["GET /cart/up"]


@pytest.mark.parametrize(
    "upgrade", [b"Connection: upgrade\r\nUpgrade: websocket", b"Connection: Upgrade\r\nUpgrade: h2c"]
)
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_upgrade_request_with_a_body_is_refused_not_smuggled(
    pair: tuple[str, int], cart_app: CartApp, upgrade: bytes, framing: str
) -> None:
    """llhttp stops at the end of an upgrade request's head and leaves its body unparsed: the
    sidecar sent the head (with its Content-Length) without the body, and once the upgrade was
    declined read the body as the next request: a GET /admin inside it reached the app without
    the policy seeing it. Such a request now gets 400 and nothing reaches the app."""
    hidden = b"GET /admin HTTP/1.1\r\nHost: cart\r\n\r\n"
    if framing == "length":
        framed = b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden
    else:
        framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
    raw = await exchange(pair, b"GET /cart/a HTTP/1.1\r\nHost: cart\r\n" + upgrade + b"\r\n" + framed)
    assert raw.startswith(b"HTTP/1.1 400") and b"Upgrade request with a body" in raw, raw
    assert cart_app.seen == []


async def test_an_absolute_form_target_is_judged_and_sent_as_the_app_reads_it(
    pair: tuple[str, int], cart_app: CartApp
) -> None:
    """RFC 3986: the authority ends at the first /, ? or #, so ``http://cart?/cart/x`` is the path
    ``/`` (with a query), which the policy (only /cart/*) denies; RFC 9112 section 3.2.2: the Host
    a proxy sends is the target's authority, not the Host header that came with it."""
    denied = await exchange(
        pair, b"GET http://cart?/cart/x HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    assert denied.startswith(b"HTTP/1.1 403"), denied
    raw = await exchange(
        pair, b"GET http://cart.shop/cart/abs?q=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200"), raw
    seen = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert seen["path"] == "/cart/abs?q=1" and seen["headers"]["host"] == "cart.shop", seen
    assert cart_app.seen == ["GET /cart/abs?q=1"]


async def test_pipelined_requests_answered_in_order(pair: tuple[str, int], mesh: Mesh) -> None:
    reqs = (
        b"".join(f"GET /cart/{i} HTTP/1.1\r\nHost: cart\r\n\r\n".encode() for i in range(3))
        + b"GET /nope HTTP/1.1\r\nHost: cart\r\n\r\nGET /cart/last HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    for addr in both(mesh):
        raw = await exchange(addr, reqs)
        statuses = re.findall(rb"HTTP/1\.1 (\d\d\d)", raw)
        paths = [p.decode() for p in re.findall(rb'"path": "([^"]+)"', raw)]
        if addr[1] == APP:
            assert statuses == [b"200", b"200", b"200", b"200", b"200"]
        else:
            assert statuses == [b"200", b"200", b"200", b"403", b"200"]
        assert paths[:3] == ["/cart/0", "/cart/1", "/cart/2"] and paths[-1] == "/cart/last"


async def test_large_streamed_bodies_both_ways(pair: tuple[str, int], mesh: Mesh) -> None:
    payload = bytes(range(256)) * 40_000  # ~10 MB, sent chunked, echoed chunked

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    for host, port in both(mesh):
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{host}:{port}/cart/echo", data=chunks()) as resp,
        ):
            assert resp.status == 200
            assert resp.headers.get("transfer-encoding", "").lower() == "chunked"
            assert await resp.read() == payload


async def test_a_client_that_does_not_read_stops_the_app_not_fills_the_sidecars(
    pair: tuple[str, int], cart_app: CartApp
) -> None:
    """Backpressure through both sidecars: a 1 GB response to a client that reads nothing stalls
    the app once the socket buffers and the sidecars' bounded buffers are full."""
    reader, writer = await asyncio.open_connection(*pair)
    writer.write(b"GET /cart/firehose HTTP/1.1\r\nHost: cart\r\n\r\n")
    await reader.readexactly(1024)
    await asyncio.sleep(2.0)
    stalled_at = cart_app.firehose_sent
    await asyncio.sleep(1.0)
    assert cart_app.firehose_sent == stalled_at, "the app is still sending: something buffers it all"
    # Kernel socket buffers of four connections (loopback autotunes to several MB each) plus the
    # sidecars' own bounded buffers: far less than the 1 GB an unbounded proxy would take in.
    assert stalled_at < 128 << 20, stalled_at
    writer.transport.abort()


async def test_content_length_body(pair: tuple[str, int], mesh: Mesh) -> None:
    for host, port in both(mesh):
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{host}:{port}/cart/x", data=b"y" * 300_000) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["body"] == 300_000


async def test_expect_100_continue(pair: tuple[str, int], mesh: Mesh) -> None:
    head = b"POST /cart/echo HTTP/1.1\r\nHost: cart\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    for addr in both(mesh):
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100"), interim  # the server asks for the body
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        assert final.startswith(b"HTTP/1.1 200") and b"hello" in final
        writer.close()


async def test_a_denied_upgrade_leaves_both_connections_usable(pair: tuple[str, int]) -> None:
    """A WebSocket upgrade the cart's policy denies gets 403 from cart's sidecar, which did not
    take the upgrade as declined: the frontend's sidecar pooled the connection, and the next
    request on it waited for cart's head timeout (10 s) and got 408."""
    upgrade = (
        b"GET /admin HTTP/1.1\r\nHost: cart\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    began = time.monotonic()
    raw = await exchange(pair, upgrade + b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"403", b"200"], raw
    again = await exchange(pair, b"GET /cart/2 HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
    assert again.startswith(b"HTTP/1.1 200"), again
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("path", [b"/cart/status/101", b"/cart/fake-switch"])
async def test_a_101_that_is_no_websocket_switch_does_not_splice_the_connection(
    pair: tuple[str, int], cart_app: CartApp, path: bytes
) -> None:
    """An allowed endpoint answering 101 (a status the caller chooses, or Upgrade: websocket with a
    Sec-WebSocket-Accept that answers no key) while it goes on speaking HTTP: both connections were
    spliced, and the caller's next request (a path the policy denies, with an identity header of
    its choosing) reached the app unseen. RFC 9110 7.8 and RFC 6455 4.1: such a 101 is no switch;
    it gets 502, and what follows is read as the next request."""
    upgrade = (
        b"GET " + path + b" HTTP/1.1\r\nHost: cart\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    raw = await exchange(
        pair, upgrade + b"GET /admin HTTP/1.1\r\nHost: cart\r\n" + SPOOFED + b"Connection: close\r\n\r\n"
    )
    assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"502", b"403"], raw
    assert cart_app.seen == [f"GET {path.decode()}"], cart_app.seen  # once: an answer is not retried
    # On a pooled connection too (the free retry is for one closed under the request, unanswered)
    raw = await exchange(
        pair,
        b"GET /cart/x HTTP/1.1\r\nHost: cart\r\n\r\n"
        + upgrade.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1),
    )
    assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"200", b"502"], raw
    assert cart_app.seen[1:] == ["GET /cart/x", f"GET {path.decode()}"], cart_app.seen


async def test_denied_100_continue_gets_403_without_sending_the_body(pair: tuple[str, int]) -> None:
    head = b"PUT /cart/x HTTP/1.1\r\nHost: cart\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    raw = await exchange(pair, head)
    assert raw.startswith(b"HTTP/1.1 403")  # and then the connection is closed (read until EOF)


async def test_head_204_304_have_no_body(pair: tuple[str, int], mesh: Mesh) -> None:
    req = (
        b"HEAD /cart/h HTTP/1.1\r\nHost: cart\r\n\r\n"
        b"GET /cart/status/204 HTTP/1.1\r\nHost: cart\r\n\r\n"
        b"GET /cart/status/304 HTTP/1.1\r\nHost: cart\r\n\r\n"
        b"GET /cart/end HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    for addr in both(mesh):
        raw = await exchange(addr, req)
        statuses = re.findall(rb"HTTP/1\.1 (\d\d\d)", raw)
        assert statuses == [b"200", b"204", b"304", b"200"], raw
        assert raw.count(b'{"method"') == 1  # only the last one has a body


async def test_the_sidecars_own_answer_to_head_has_no_body(pair: tuple[str, int]) -> None:
    """RFC 9110 9.3.2: a denial (403) of a HEAD is the head alone; the next request on the
    connection is read as a request, not after a stray body."""
    req = (
        b"HEAD /admin HTTP/1.1\r\nHost: cart\r\n\r\n"  # no rule allows /admin
        b"GET /cart/end HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    raw = await exchange(pair, req)
    assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"403", b"200"], raw
    first = raw.split(b"\r\n\r\n", 1)[1]
    assert first.startswith(b"HTTP/1.1 200"), raw  # nothing between the 403's head and the next answer


async def test_websocket_upgrade(pair: tuple[str, int], mesh: Mesh) -> None:
    for host, port in both(mesh):
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://{host}:{port}/cart/ws") as ws,
        ):
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "HELLO"
            await ws.send_bytes(b"\x01\x02\x03")
            assert (await ws.receive(timeout=5)).data == b"\x03\x02\x01"
            await ws.close()


async def test_a_websocket_the_new_policy_no_longer_allows_is_closed(
    pair: tuple[str, int], mesh: Mesh
) -> None:
    """After its 101 a WebSocket is spliced bytes no request decision sees again: withdrawing the
    rule that let its request through left it running; it is decided again, and closed."""
    cart = mesh.sidecars["cart"]
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://{pair[0]}:{pair[1]}/cart/ws") as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "HELLO"
        mesh.write("allow.yaml", ALLOW_CART_PATHS.replace('"/cart/*"', '"/cart/other"'))
        assert cart.reload_config()
        with contextlib.suppress(ConnectionError):
            await ws.send_str("after")
        assert (await ws.receive(timeout=5)).type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
    assert cart.metrics.denials.labels("shop/cart-http")._value.get() == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /cart/x HTTP/1.1\r\nHost: cart\r\nContent-Length: abc\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost cart\r\n\r\n", b"400"),
        (b"GET /cart/x HTTP/1.1\r\nHost: cart\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"POST /cart/echo HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
        # RFC 9112 section 3.2: a server answers 400 to no Host, two, or an invalid one.
        (b"GET /cart/x HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /cart/x HTTP/1.1\r\nHost: cart\r\nHost: admin\r\n\r\n", b"400"),
        (b"GET /cart/x HTTP/1.1\r\nHost: a b\r\n\r\n", b"400"),
        (b"GET /cart/x HTTP/1.1\r\nHost: cart\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n", b"431"),
        (b"GET * HTTP/1.1\r\nHost: cart\r\n\r\n", b"400"),  # RFC 9112 3.2.4: OPTIONS only
    ],
    ids=[
        "content-length",
        "header-line",
        "huge-headers",
        "bad-chunk",
        "no-host",
        "two-hosts",
        "bad-host",
        "101-fields",
        "asterisk-get",
    ],
)
async def test_malformed_requests_get_an_error_and_a_close(
    pair: tuple[str, int], request_bytes: bytes, status: bytes
) -> None:
    reader, writer = await asyncio.open_connection(*pair)
    writer.write(request_bytes)
    raw = await asyncio.wait_for(reader.read(), 10)  # the sidecar closes after answering
    writer.close()
    assert raw.split(b" ")[1] == status or raw == b"", raw
    # The sidecars are fine: the next connection works.
    ok = await exchange(pair, b"GET /cart/ok HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


async def test_plaintext_http_in_permissive_mode_is_authorized_per_request(
    mesh: Mesh, cart_app: CartApp
) -> None:
    """No sidecar on the caller's side: detection on cart's plaintext inbound, the caller is
    unauthenticated, and the policy (frontend only) denies each request with its reason."""
    await mesh.sidecar("cart", CART, mode="permissive")
    raw = await exchange(
        (mesh.addr(CART), 15006), b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 403")
    # A caller outside the mesh learns no policy names or defaults (Envoy: "access denied").
    assert b"sidemesh-denied-reason: denied by the workload's policy (callers outside the mesh" in raw
    assert b"cart-http" not in raw and b"default" not in raw
    assert cart_app.seen == []


async def test_trace_headers_are_replaced_not_duplicated(pair: tuple[str, int]) -> None:
    req = (
        b"GET /cart/t HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n"
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
    )
    raw = await exchange(pair, req)
    seen = json.loads(raw.partition(b"\r\n\r\n")[2])["headers"]
    assert seen["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")  # same trace


async def test_app_closing_an_idle_pooled_connection_is_not_an_error(mesh: Mesh) -> None:
    """aiohttp closes idle keep-alive connections (here after 0.2 s): the sidecar's pooled
    connection to it is then dropped, and the next request uses a new one."""
    app = CartApp(keepalive_timeout=0.2)
    await app.start(mesh.addr(CART), APP)
    try:
        await mesh.sidecar("cart", CART)
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        pair = (mesh.addr(FRONTEND), OUT)
        results = await asyncio.to_thread(_keepalive_session, *pair, [("GET", "/cart/1")])
        await asyncio.sleep(0.5)
        results += await asyncio.to_thread(_keepalive_session, *pair, [("GET", "/cart/2")])
        assert [r[0] for r in results] == [200, 200]
        assert len(app.peers) == 2  # the first connection was closed by the app, not reused
    finally:
        await app.runner.cleanup()


async def test_a_denial_before_the_end_of_the_body_is_not_reset_away(pair: tuple[str, int]) -> None:
    """cart's sidecar denies the POST at its head; the frontend's sidecar passed the 403 on and
    closed the app's connection at once while the app was still sending its body: the next bytes
    drew a reset, and the app lost the 403 it had not read yet (asyncio's reader raises the reset
    before its buffered bytes). RFC 9112 9.6: half-close, read what still comes for a while, then
    close."""
    reader, writer = await asyncio.open_connection(*pair)
    try:
        for piece in (b"POST /admin HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                      b"5\r\nhello\r\n", b"0\r\n\r\n"):  # fmt: skip
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.3)  # the 403 comes meanwhile, unread
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer


def _post_without_waiting(addr: tuple[str, int], head: bytes, size: int) -> bytes:
    """Send ``head`` and ``size`` bytes of body without reading (as Go's Transport and http.client
    send after Expect: 100-continue); then whatever comes back."""
    with socket.create_connection(addr, timeout=10) as s:
        try:
            s.sendall(head)
            for _ in range(size // 16384):
                s.sendall(b"x" * 16384)
        except OSError:
            pass  # (refused before the end: the answer is what counts)
        answer = b""
        with contextlib.suppress(OSError):
            while data := s.recv(65536):
                answer += data
        return answer


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (
            b"POST /admin HTTP/1.1\r\nHost: cart\r\nContent-Length: 4194304\r\nExpect: 100-continue\r\n\r\n",
            403,
        ),
        (b"POST /cart/%zz HTTP/1.1\r\nHost: cart\r\nContent-Length: 4194304\r\n\r\n", 400),
    ],
    ids=["denied-expecting-100", "bad-target"],
)
async def test_an_answer_before_the_body_ends_reaches_the_client(
    pair: tuple[str, int], head: bytes, status: int
) -> None:
    """cart's sidecar answers (403 for a request waiting for 100 whose client sends its body anyway,
    400 for a target it cannot normalize) and closed at once with the body still coming: the
    reset took the answer with it, and the frontend's sidecar told the client 502, upstream failed."""
    answer = await asyncio.to_thread(_post_without_waiting, pair, head, 4194304)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]


@pytest.mark.parametrize("leave", ["reset", "fin"])
async def test_a_client_that_leaves_gives_up_its_request(mesh: Mesh, leave: str) -> None:
    """The app never answers (no Service timeout, the default); the clients give up. Nothing
    cancelled the requests: each held its relay, a pooled mTLS connection and an app connection
    until the app answered, for good with a hung app (Envoy resets the upstream when its
    downstream goes, a FIN included: HTTP has no half-close there)."""
    app_closed = 0

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal app_closed
        try:
            await reader.readuntil(b"\r\n\r\n")  # and never answer
            await reader.read()  # until the sidecar gives the connection up (FIN or reset)
        except ConnectionError:
            pass
        finally:
            app_closed += 1
            writer.close()

    async with raw_app_pair(mesh, app) as pair:
        frontend, cart = mesh.sidecars["frontend"], mesh.sidecars["cart"]
        writers = []
        for _ in range(5):
            _, writer = await asyncio.open_connection(*pair)
            writers.append(writer)
            writer.write(b"GET /cart/hang HTTP/1.1\r\nHost: cart\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            if leave == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
            else:
                writer.write_eof()
        deadline = time.monotonic() + 3
        while (app_closed < 5 or frontend.relays or cart.relays) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert app_closed == 5 and not frontend.relays and not cart.relays, (
            app_closed,
            frontend.relays,
            cart.relays,
        )
        for writer in writers:
            writer.close()


async def test_trailers_carry_no_connection_fields_or_identity(mesh: Mesh) -> None:
    """RFC 9110 6.5.1: trailers carry no framing, routing or connection fields. A caller's trailer
    ``Connection: close`` went to the app on the pooled connection, which the app's parser then
    refused for the next (another caller's) request with 400; a trailer XFCC reached the app as
    if the sidecar had said it. Both are dropped; other trailers pass."""
    received: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer), contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                message = head
                if b"transfer-encoding: chunked" in head.lower():
                    message += await reader.readuntil(b"\r\n0\r\n")
                    message += (
                        await reader.readuntil(b"\r\n\r\n") if not message.endswith(b"\r\n\r\n") else b""
                    )
                received.append(message)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    async with raw_app_pair(mesh, app) as pair:
        post = (
            b"POST /cart/t HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            b"Connection: close\r\nX-Forwarded-Client-Cert: By=x;URI=spiffe://cluster.local/ns/shop/sa/admin\r\n"
            b"X-Checksum: 42\r\n\r\n"
        )
        first = await exchange(pair, post, until=b"ok")
        second = await exchange(pair, b"GET /cart/next HTTP/1.1\r\nHost: cart\r\n\r\n", until=b"ok")
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), (first, second)
    trailers = received[0].split(b"\r\n0\r\n", 1)[1].lower()
    assert b"x-checksum: 42" in trailers, received
    assert b"connection" not in trailers and b"spiffe://" not in trailers, received


async def test_a_post_is_never_sent_twice_when_a_pooled_connection_breaks_under_it(mesh: Mesh) -> None:
    """The app reads a POST on a reused connection and drops the connection without answering (it
    may have acted on it): RFC 9112 9.3.1 forbids a proxy to send it again by itself. The client
    gets 502 and the app saw the POST once."""
    seen: list[str] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n")[0].decode()
                length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                if length:
                    await reader.readexactly(int(length[1]))
                seen.append(line)
                if line.startswith("POST") and seen.count(line) == 1:
                    return  # acted on it (charged the card), then the connection broke: no answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with raw_app_pair(mesh, app) as pair:
        post = (
            b"POST /cart/pay HTTP/1.1\r\nHost: cart\r\nContent-Length: 7\r\nConnection: close\r\n\r\ncharge1"
        )
        raw = await exchange(pair, b"GET /cart/warm HTTP/1.1\r\nHost: cart\r\n\r\n" + post)
        assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"200", b"502"], raw
        assert seen == ["GET /cart/warm HTTP/1.1", "POST /cart/pay HTTP/1.1"], seen


async def test_a_malformed_response_on_a_reused_connection_is_not_sent_again(mesh: Mesh) -> None:
    """The free retry is for a pooled connection closed under a request before any answer: an app
    that answered (malformed: obs-fold) had the request, and a GET (or DELETE) reached it twice."""
    seen: list[str] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append(head.split(b"\r\n")[0].decode())
                if seen[-1].startswith("GET /cart/item"):
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async with raw_app_pair(mesh, app) as pair:
        item = b"GET /cart/item HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n"
        raw = await exchange(pair, b"GET /cart/warm HTTP/1.1\r\nHost: cart\r\n\r\n" + item)
        assert re.findall(rb"HTTP/1\.1 (\d\d\d)", raw) == [b"200", b"502"], raw
        assert seen == ["GET /cart/warm HTTP/1.1", "GET /cart/item HTTP/1.1"], seen


async def test_a_transfer_coded_response_is_not_sent_to_an_http10_client_undeclared(mesh: Mesh) -> None:
    """RFC 9112 6.1: an HTTP/1.0 client cannot be sent Transfer-Encoding; dropping the header left
    a gzip-coded body with nothing to say so (the client took the raw bytes as the body). 502, as
    for any response that cannot be relayed; an HTTP/1.1 client gets it as it is."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n"
                )
                await writer.drain()
        writer.close()

    async with raw_app_pair(mesh, app) as pair:
        old = await exchange(pair, b"GET /cart/a HTTP/1.0\r\nHost: cart\r\n\r\n")
        assert old.startswith(b"HTTP/1.1 502"), old
        new = await exchange(pair, b"GET /cart/b HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
        assert new.startswith(b"HTTP/1.1 200") and b"gzip" in new.lower() and b"GZIP" in new, new


async def test_no_1xx_reaches_an_http10_client(mesh: Mesh) -> None:
    """The app is spoken to in HTTP/1.1 and may send 103 Early Hints; RFC 9110 15.2: a server
    never sends a 1xx to an HTTP/1.0 client, so the sidecar keeps it back. An HTTP/1.1 client
    gets it."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                )
                await writer.drain()
        writer.close()

    async with raw_app_pair(mesh, app) as pair:
        old = await exchange(pair, b"GET /cart/a HTTP/1.0\r\nHost: cart\r\n\r\n")
        assert re.findall(rb"HTTP/1\.\d (\d\d\d)", old) == [b"200"], old
        new = await exchange(pair, b"GET /cart/b HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
        assert re.findall(rb"HTTP/1\.1 (\d\d\d)", new) == [b"103", b"200"], new


async def test_draining_closes_idle_inbound_keepalive_connections(pair: tuple[str, int], mesh: Mesh) -> None:
    """The frontend's pooled connection to cart is idle between requests: when cart drains, it
    closes that connection within a second instead of holding the drain to its timeout."""
    assert (await asyncio.to_thread(_keepalive_session, *pair, [("GET", "/cart/1")]))[0][0] == 200
    cart = mesh.sidecars["cart"]
    assert cart.relays  # the pooled keep-alive connection from the frontend's sidecar
    began = asyncio.get_running_loop().time()
    await cart.drain(timeout=10)
    assert asyncio.get_running_loop().time() - began < 3


async def test_a_slow_request_head_gets_408_and_is_counted(mesh: Mesh, pair: tuple[str, int]) -> None:
    frontend = mesh.sidecars["frontend"]
    object.__setattr__(frontend.config, "request_head_timeout", __import__("datetime").timedelta(seconds=0.5))
    reader, writer = await asyncio.open_connection(*pair)
    writer.write(b"GET /cart/slow HTTP/1.1\r\nHost: cart\r\n")  # never the blank line
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert out.startswith(b"HTTP/1.1 408 "), out
    sample = {"direction": "outbound", "reason": "head"}
    assert (
        frontend.metrics.registry.get_sample_value("sidemesh_proxy_connections_timed_out_total", sample) == 1
    )


async def test_a_response_that_starts_while_draining_closes_the_connection(
    mesh: Mesh, cart_app: CartApp
) -> None:
    """RFC 9112 9.6, as Envoy drains: the request in flight when the drain begins is answered, with
    `Connection: close`, and the connection closes after it (the client sends its next request
    elsewhere, not on a connection about to close under it)."""
    mesh.write(
        "allow.yaml", ALLOW_CART_PATHS + "  - from: [{unauthenticated: true}]\n    to: {ports: [8080]}\n"
    )
    cart = await mesh.sidecar("cart", CART, mode="permissive")
    reader, writer = await asyncio.open_connection(mesh.addr(CART), 15006)
    try:
        writer.write(b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\n\r\n")  # before: kept alive
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"connection: close" not in head.lower()
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(b"POST /cart/2 HTTP/1.1\r\nHost: cart\r\nContent-Length: 10\r\n\r\nhello")
        await asyncio.sleep(0.2)
        drain = asyncio.create_task(cart.drain(timeout=10))
        await asyncio.sleep(0.2)
        writer.write(b"world")  # the app answers now: its head goes out during the drain
        rest = await asyncio.wait_for(reader.read(), 10)  # to EOF: the sidecar closes after it
        assert rest.startswith(b"HTTP/1.1 200 ") and b"\r\nconnection: close\r\n" in rest.lower()
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["body"] == 10
        await asyncio.wait_for(drain, 5)
    finally:
        writer.close()


async def test_connections_between_sidecars_have_tcp_keepalive(pair: tuple[str, int], mesh: Mesh) -> None:
    """Linkerd's default (10 s): a peer gone without a FIN is noticed, idle pooled ones included."""
    from proxy import pool

    await asyncio.to_thread(_keepalive_session, *pair, [("GET", "/cart/1")])
    idle = [p for q in pool.pool_of(mesh.sidecars["frontend"])._idle.values() for p, _, _ in q]
    assert idle, "the connection to cart's sidecar went back to the pool"
    sock = idle[0].transport.get_extra_info("socket") if idle[0].transport is not None else None
    assert sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10


async def test_connections_a_sidecar_accepts_from_callers_have_tcp_keepalive(
    pair: tuple[str, int], mesh: Mesh
) -> None:
    """The accepted side too: cart's sidecar holds the frontend's pooled connection open, and its
    socket has a keepalive timer (``ss -o`` shows the kernel's timers)."""
    if shutil.which("ss") is None:
        pytest.skip("ss not found: install iproute2")
    await asyncio.to_thread(_keepalive_session, *pair, [("GET", "/cart/1")])
    await asyncio.sleep(0.5)  # idle (all acknowledged): ss shows the keepalive timer, not a retransmit one
    port = mesh.sidecars["cart"].inbound_port
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    accepted = [line for line in out.splitlines() if mesh.addr(CART) in line]
    assert accepted and all("keepalive" in line for line in accepted), out


async def test_a_response_before_the_request_body_ends_says_the_connection_closes(mesh: Mesh) -> None:
    """The app answers 413 at the head of a big upload (and would read the rest); a denial answers
    a request waiting for 100-continue. The sidecar closes the connection after such a response
    (RFC 9112 9.6) but its head said keep-alive (and the callee's Connection: close is hop-by-hop,
    dropped by the caller's sidecar): a pooling client sent its next request into a closing
    connection and lost it (RFC 9110 10.1.1; Envoy says close here too)."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big\n")
            await writer.drain()
            await reader.read()
        writer.close()

    async with raw_app_pair(mesh, app) as pair:
        for request in (
            b"POST /cart/upload HTTP/1.1\r\nHost: cart\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000,
            b"POST /admin HTTP/1.1\r\nHost: cart\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection(*pair)
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.split(b" ")[1] in (b"413", b"403"), head
                assert b"\r\nconnection: close\r\n" in head.lower(), head
            finally:
                writer.close()


@pytest.mark.parametrize(
    ("second", "status"),
    [
        (
            b"GET /cart/a HTTP/1.1\r\nHost: cart\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
        (b"GET /cart/a?" + b"v" * 70000 + b" HTTP/1.1\r\nHost: cart\r\n\r\n", 414),
        (b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n", 405),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage", 400),
    ],
)
async def test_a_bad_request_pipelined_behind_a_good_one_is_answered(
    pair: tuple[str, int], second: bytes, status: int
) -> None:
    """Parsed with the first, its error was kept and the connection closed after the first
    response, unanswered: a pipelining client could not tell "refused" from "connection lost"
    (RFC 9112 2.2, 3). Sent alone, the same request is answered."""
    raw = await exchange(pair, b"GET /cart/first HTTP/1.1\r\nHost: cart\r\n\r\n" + second)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", str(status).encode()], raw[:600]
    assert status != 414 or b"HTTP/1.1 414 URI Too Long\r\n" in raw  # (it had no reason phrase)


async def test_a_request_that_comes_after_the_detection_timeout_is_still_parsed(
    mesh: Mesh, cart_app: CartApp
) -> None:
    """The client connects and sends its request 1.5 s later, after the caller's detection (1 s)
    decided nothing: carried as opaque to the callee, it reached the app unparsed, with the
    caller's own x-forwarded-client-cert. The caller now says nothing of what it did not see, and
    the callee detects (and parses) it itself."""
    await mesh.sidecar("cart", CART)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        await asyncio.sleep(1.5)
        writer.write(b"GET /cart/who HTTP/1.1\r\nHost: cart\r\n" + SPOOFED + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        seen = json.loads(await reader.readexactly(length))["headers"]
        assert seen.get("x-forwarded-client-cert", "").endswith(
            "URI=spiffe://cluster.local/ns/shop/sa/frontend"
        )
    finally:
        writer.close()


async def test_permissive_plaintext_to_a_port_a_service_declares_opaque_goes_as_sent(
    mesh: Mesh, cart_app: CartApp
) -> None:
    """A plaintext caller (permissive mode) parsed nothing: on a port a Service declares opaque its
    bytes go to the app as sent, as on the pod's own opaque ports (it was parsed: hop-by-hop headers,
    a custom upgrade, dropped)."""
    mesh.write(
        "workloads.yaml",
        MESH_YAML.format(net=mesh.net) + CART_RAW,
    )
    mesh.write(
        "allow.yaml",
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\nmetadata: {name: open, namespace: shop}\n"
        "spec:\n  rules:\n  - from: [{unauthenticated: true}]\n",
    )
    await mesh.sidecar("cart", CART, mode="permissive")
    reader, writer = await asyncio.open_connection(mesh.addr(CART), 15006)
    try:
        writer.write(b"GET /cart/who HTTP/1.1\r\nHost: cart\r\nKeep-Alive: timeout=5\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        seen = json.loads(await reader.readexactly(length))["headers"]
        assert seen.get("keep-alive") == "timeout=5", seen
    finally:
        writer.close()


async def test_a_pooled_connection_is_not_taken_after_the_trust_changed(
    pair: tuple[str, int], mesh: Mesh, tmp_path: Path
) -> None:
    """The caller's bundle loses the root the callee's certificate chains to: a new request went
    on over the pooled connection its old handshake had trusted, for as long as traffic kept it
    busy (docs/operations.md: the old root is dropped within 5 s). New requests take connections
    made under the identity's current trust."""
    from ca import keys
    from tests.support import pki

    assert (await exchange(pair, b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\n\r\n", b"\r\n\r\n")).startswith(
        b"HTTP/1.1 200"
    )  # (pooled now)
    frontend = mesh.sidecars["frontend"]
    # A renewal keeps the trust: pooled connections go on being used (each renewal replaced every
    # one of them, and an app's HTTP/2 connection kept its old upstreams open beside the new).
    generation, reused = frontend.identity.generation, pool.pool_of(frontend).reused
    await frontend.identity.renew()
    assert frontend.identity.generation == generation
    assert (await exchange(pair, b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\n\r\n", b"\r\n\r\n")).startswith(
        b"HTTP/1.1 200"
    )
    assert pool.pool_of(frontend).reused == reused + 1
    other = pki.make_authority(tmp_path / "other")
    bundle = tmp_path / "only-another-root.pem"
    bundle.write_bytes(keys.cert_pem(*other.roots))
    frontend.identity.bundle_file = bundle
    assert frontend.identity.reload_bundle()
    raw = await exchange(pair, b"GET /cart/1 HTTP/1.1\r\nHost: cart\r\n\r\n", b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 502"), raw[:200]
