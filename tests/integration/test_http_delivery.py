"""Delivery on the HTTP path (frontend -> cart, two cart endpoints): per-request balancing (a slow
endpoint gets fewer requests), retries of idempotent requests on 503 (not of POST), the timeout
(504), and endpoint changes applied to the next request. Real sidecars, real aiohttp apps."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from aiohttp import web

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import ALLOW_FRONTEND, Mesh, free_net, linger_reset
from tests.integration.test_http2_outbound import Server

FRONTEND, CART1, CART2 = 1, 2, 4
OUT = 18080
APP = 8080

MESH = """\
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: frontend-1, namespace: shop, labels: {{app: frontend}}}}
spec: {{serviceAccount: frontend, address: {net}.1, ports: [{{port: 8080}}]}}
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: carta-1, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccount: cart, address: {net}.2, ports: [{{port: 8080}}]}}
{cart2}---
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
  annotations: {{sidemesh.io/retries: "2", sidemesh.io/timeout: "{timeout}"}}
spec:
  selector: {{app: cart}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""
CART2_YAML = """\
---
apiVersion: sidemesh.io/v1alpha1
kind: Workload
metadata: {{name: cartb-1, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccount: cart, address: {net}.4, ports: [{{port: 8080}}]}}
"""


class App:
    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.hits = 0
        self.fail_next = 0  # answer this many requests with 503
        self.broken = False  # answer every request with 500 at once
        self.stall = False  # answer 503 with a chunked body whose end does not come until unstalled
        self.unstalled = asyncio.Event()
        self.bodies: list[bytes] = []  # the body of every request that reached the app
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.bodies.append(await request.read())
        if request.path == "/download":  # the head at once, the body over a second
            download = web.StreamResponse()
            download.enable_chunked_encoding()
            await download.prepare(request)
            for _ in range(10):
                await asyncio.sleep(0.1)
                await download.write(b"x" * 100)
            await download.write_eof()
            return download
        if self.broken:
            return web.Response(status=500, text="broken")
        if self.stall:
            stalled = web.StreamResponse(status=503)
            stalled.enable_chunked_encoding()
            await stalled.prepare(request)
            await stalled.write(b"busy, and then nothing")
            await self.unstalled.wait()
            return stalled
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="busy")
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(text=self.name)


RUNNERS: list[web.AppRunner] = []  # cleaned up by the mesh fixture


async def start_mesh(mesh: Mesh, apps: list[tuple[int, App]]) -> None:
    for host, app in apps:
        await app.runner.setup()
        RUNNERS.append(app.runner)
        await web.TCPSite(app.runner, mesh.addr(host), APP).start()
        await mesh.sidecar("carta" if host == CART1 else "cartb", host, identity_of="cart")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))


def write_mesh(mesh: Mesh, two: bool, timeout: str = "0s") -> None:
    cart2 = CART2_YAML.format(net=mesh.net) if two else ""
    mesh.write("workloads.yaml", MESH.format(net=mesh.net, cart2=cart2, timeout=timeout))


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    ca = await start_ca()
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    m = Mesh(ca, config_dir, free_net())
    m.write("allow.yaml", ALLOW_FRONTEND)
    yield m
    await m.close()
    while RUNNERS:
        await RUNNERS.pop().cleanup()


def session(addr: tuple[str, int], requests: list[tuple[str, str]]) -> list[tuple[int, bytes]]:
    conn = http.client.HTTPConnection(*addr, timeout=10)
    out = []
    for method, path in requests:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        out.append((resp.status, resp.read()))
    conn.close()
    return out


async def test_the_balancer_measures_an_endpoint_to_the_response_head(mesh: Mesh) -> None:
    """Linkerd's peak EWMA takes the time to the response head (so does the HTTP/2 path): one
    download (head at once, body over a second) made its endpoint look a second slow, so it got
    none of the next 40 requests, and a WebSocket open for an hour would have starved it for
    minutes after."""
    write_mesh(mesh, two=True)
    a, b = App("a"), App("b")
    await start_mesh(mesh, [(CART1, a), (CART2, b)])
    addr = (mesh.addr(FRONTEND), OUT)
    [(status, body)] = await asyncio.to_thread(session, addr, [("GET", "/download")])
    assert status == 200 and len(body) == 1000
    estimates = mesh.sidecars["frontend"].balancer.describe()
    assert estimates and all(e["estimate_ms"] < 300 for e in estimates.values()), estimates


async def test_a_slow_endpoint_gets_fewer_requests(mesh: Mesh) -> None:
    write_mesh(mesh, two=True)
    fast, slow = App("fast"), App("slow", delay=0.05)
    await start_mesh(mesh, [(CART1, fast), (CART2, slow)])
    addr = (mesh.addr(FRONTEND), OUT)
    # 4 clients, 40 requests each: the balancer (P2C on peak EWMA) prefers the fast endpoint.
    results = await asyncio.gather(
        *(asyncio.to_thread(session, addr, [("GET", "/x")] * 40) for _ in range(4))
    )
    assert all(status == 200 for batch in results for status, _ in batch)
    assert fast.hits + slow.hits == 160
    assert fast.hits > 3 * slow.hits, (fast.hits, slow.hits)


async def test_an_endpoint_that_fails_fast_does_not_attract_the_traffic(mesh: Mesh) -> None:
    """500 at once (not retried: only 502-504 are) against 200 in 20 ms: counted as successes,
    the failing endpoint's latency estimate was the lower one and it took nearly everything.
    A 5xx is a failure for the balancer: penalized, then ejected after 5 in a row."""
    write_mesh(mesh, two=True)
    bad, good = App("bad"), App("good", delay=0.02)
    bad.broken = True
    await start_mesh(mesh, [(CART1, bad), (CART2, good)])
    addr = (mesh.addr(FRONTEND), OUT)
    results = await asyncio.gather(
        *(asyncio.to_thread(session, addr, [("GET", "/x")] * 50) for _ in range(4))
    )
    statuses = [status for batch in results for status, _ in batch]
    assert bad.hits + good.hits == 200
    assert bad.hits < 20 and statuses.count(200) > 180, (bad.hits, good.hits)


async def test_idempotent_requests_are_retried_post_is_not(mesh: Mesh) -> None:
    write_mesh(mesh, two=False)
    app = App("cart")
    await start_mesh(mesh, [(CART1, app)])
    addr = (mesh.addr(FRONTEND), OUT)
    app.fail_next = 2
    assert await asyncio.to_thread(session, addr, [("GET", "/r")]) == [(200, b"cart")]  # 2 retries
    assert app.hits == 3
    app.fail_next = 3
    assert (await asyncio.to_thread(session, addr, [("GET", "/r")]))[0][0] == 503  # out of retries
    app.fail_next = 1
    assert (await asyncio.to_thread(session, addr, [("POST", "/r")]))[0][0] == 503  # not idempotent


def put(addr: tuple[str, int], body: bytes, chunked: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*addr, timeout=10)
    if chunked:
        conn.request(
            "PUT", "/r", body=iter([body[: len(body) // 2], body[len(body) // 2 :]]), encode_chunked=True
        )
    else:
        conn.request("PUT", "/r", body=body)
    resp = conn.getresponse()
    out = (resp.status, resp.read())
    conn.close()
    return out


async def test_a_request_body_is_replayed_on_retry_when_small(mesh: Mesh) -> None:
    write_mesh(mesh, two=False)
    app = App("cart")
    await start_mesh(mesh, [(CART1, app)])
    addr = (mesh.addr(FRONTEND), OUT)
    small = bytes(range(256)) * 40  # 10 KiB: kept while it streams, sent again on a retry
    for chunked in (False, True):
        app.fail_next, app.bodies = 2, []
        assert await asyncio.to_thread(put, addr, small, chunked) == (200, b"cart")
        assert app.bodies == [small] * 3, [len(b) for b in app.bodies]
    big = small * 10  # 100 KiB: more than is kept (64 KiB), so the 503 goes back to the client
    app.fail_next, app.bodies = 1, []
    assert (await asyncio.to_thread(put, addr, big))[0] == 503
    assert app.bodies == [big]
    # Head and body in one write (the sidecar may read them together, and take the request whole):
    # the small body is sent again on the retries, the big one goes once and its 503 comes back.
    for body, fails, expected in ((small, 2, b"200"), (big, 1, b"503")):
        app.fail_next, app.bodies = fails, []
        assert (await asyncio.to_thread(put_at_once, addr, body)).startswith(b"HTTP/1.1 " + expected)
        assert app.bodies == [body] * (fails + 1 if expected == b"200" else 1), [len(b) for b in app.bodies]


def put_at_once(addr: tuple[str, int], body: bytes) -> bytes:
    """A PUT whose head and body go in one write; the response's head back."""
    with socket.create_connection(addr, timeout=10) as sock:
        head = b"PUT /r HTTP/1.1\r\nHost: cart\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        sock.sendall(head + body)
        got = b""
        while b"\r\n\r\n" not in got and (data := sock.recv(65536)):
            got += data
        return got


async def test_a_retried_503_whose_body_stalls_is_not_waited_for(mesh: Mesh) -> None:
    """Envoy resets the upstream stream of a response it retries: the sidecar read the whole body
    of the 503 first, with no deadline, and a body that never ended held the request for good
    (the client got no answer at all, the Service timeout did not apply)."""
    write_mesh(mesh, two=False, timeout="5s")
    app = App("cart")
    app.stall = True
    await start_mesh(mesh, [(CART1, app)])
    conn = http.client.HTTPConnection(mesh.addr(FRONTEND), OUT, timeout=10)
    began = time.monotonic()
    try:
        await asyncio.to_thread(conn.request, "GET", "/r")
        response = await asyncio.to_thread(conn.getresponse)
        took = time.monotonic() - began
    finally:
        conn.close()
        app.unstalled.set()
    # Two retries, each after a stalled 503; the third's 503 goes to the client as it comes.
    assert response.status == 503 and app.hits == 3, (response.status, app.hits)
    assert took < 2.0, took


async def test_a_retry_goes_to_another_endpoint(mesh: Mesh) -> None:
    """Envoy's previous-hosts predicate: the endpoint that answered 503 is not chosen again while
    another can be. The HTTP/1.1 path forgot it between attempts: with a healthy endpoint slower
    than the failing one's penalized estimate, one request spent all three attempts on it."""
    write_mesh(mesh, two=True)
    bad, good = App("bad"), App("good", delay=0.3)
    bad.fail_next = 1000
    await start_mesh(mesh, [(CART1, bad), (CART2, good)])
    for _ in range(4):
        before = bad.hits
        assert await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("GET", "/r")]) == [
            (200, b"good")
        ]
        assert bad.hits - before <= 1, bad.hits - before


def slow_put(addr: tuple[str, int], pieces: int, pause: float) -> tuple[int, bytes]:
    def body() -> Iterator[bytes]:
        for _ in range(pieces):
            time.sleep(pause)
            yield b"x" * 1000

    conn = http.client.HTTPConnection(*addr, timeout=10)
    try:
        conn.request("PUT", "/upload", body=body(), encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


async def test_the_timeout_counts_from_the_end_of_the_request(mesh: Mesh) -> None:
    """As Envoy's route timeout: an upload that takes longer than the Service's timeout is not cut
    (it was, at the timeout, with no answer); the wait for the answer after it still is."""
    write_mesh(mesh, two=False, timeout="500ms")
    app = App("cart")
    await start_mesh(mesh, [(CART1, app)])
    addr = (mesh.addr(FRONTEND), OUT)
    began = time.monotonic()
    assert await asyncio.to_thread(slow_put, addr, 6, 0.2) == (200, b"cart")
    assert time.monotonic() - began > 1.0 and app.bodies[-1] == b"x" * 6000
    app.delay = 2.0
    began = time.monotonic()
    status, _ = await asyncio.to_thread(slow_put, addr, 3, 0.2)
    assert status == 504 and time.monotonic() - began < 1.8, (status, time.monotonic() - began)


async def test_a_request_waiting_for_100_continue_is_still_cut_by_the_timeout(mesh: Mesh) -> None:
    """The clock runs from the end of the request body; a client that waits for 100 Continue sends
    no body until the app says so, and an app that never answers would then never be cut: for
    such a request the clock runs from the head until the 100 comes."""
    write_mesh(mesh, two=False, timeout="300ms")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer), contextlib.suppress(ConnectionError):
            await reader.read()  # never a 100, never an answer

    server = await asyncio.start_server(silent, mesh.addr(CART1), APP)
    try:
        await mesh.sidecar("carta", CART1, identity_of="cart")
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
        began = time.monotonic()
        writer.write(b"PUT /r HTTP/1.1\r\nHost: cart\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 504") and time.monotonic() - began < 1.5, head
    finally:
        server.close()


async def test_an_upload_whose_client_stopped_waiting_for_100_is_not_cut(mesh: Mesh) -> None:
    """RFC 9110 10.1.1: a client may stop waiting for 100 Continue and send its body, and a server
    need not send 100 (an HTTP/1.0 one: Python's wsgiref). The clock kept running from the head
    while the body streamed: curl's upload (Expect by itself, 1 s of waiting) got 504 midway."""
    write_mesh(mesh, two=False, timeout="500ms")

    async def no_100(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer), contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%d" % (len(str(len(body))), len(body))
            )
            await writer.drain()

    server = await asyncio.start_server(no_100, mesh.addr(CART1), APP)
    try:
        await mesh.sidecar("carta", CART1, identity_of="cart")
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
        writer.write(b"PUT /r HTTP/1.1\r\nHost: cart\r\nContent-Length: 6000\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.sleep(0.3)  # no 100 comes: the client sends its body anyway, slowly
        for _ in range(6):
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.2)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.read(4), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200") and body == b"6000", (head, body)
    finally:
        server.close()


async def test_uploads_the_clients_abandon_are_not_the_endpoints_failures(mesh: Mesh) -> None:
    """A client leaving mid-upload (a tab closed, a client timeout) or sending a body that cannot be
    read released the endpoint as failed: 12 abandoned uploads ejected both healthy endpoints."""
    write_mesh(mesh, two=True)
    a, b = App("a"), App("b")
    await start_mesh(mesh, [(CART1, a), (CART2, b)])
    frontend = mesh.sidecars["frontend"]
    addr = (mesh.addr(FRONTEND), OUT)
    await asyncio.to_thread(session, addr, [("GET", "/x")] * 4)
    for i in range(12):
        _, writer = await asyncio.open_connection(*addr)
        if i % 2:
            writer.write(
                b"PUT /upload HTTP/1.1\r\nHost: cart\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
            )
        else:  # a chunk size that is no number: the sidecar answers 400 itself
            writer.write(b"PUT /upload HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    states = frontend.balancer.describe()
    assert all(s["failures"] == 0 and s["ejected_for_s"] == 0 for s in states.values()), states
    assert all(s["outstanding"] == 0 for s in states.values()), states


async def test_a_request_is_not_sent_again_once_a_100_continue_went_to_the_client(mesh: Mesh) -> None:
    """The app sent 100 Continue, read the body and answered 503; the retry sent the request
    again and the client saw a second 100 Continue (Envoy stops retrying once an upstream 1xx
    was passed on). The 503 is the answer."""
    write_mesh(mesh, two=False)
    app = App("a")
    await start_mesh(mesh, [(CART1, app)])
    app.fail_next = 1  # aiohttp sends 100 Continue when the handler reads the body, then the 503
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    try:
        writer.write(b"PUT /r HTTP/1.1\r\nHost: cart\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 503"), head
    assert app.hits == 1 and app.bodies == [b"hello"], (app.hits, app.bodies)


@pytest.mark.parametrize("how", ["left-unanswered", "bad-first-chunk", "left-a-503"])
async def test_a_request_the_client_gave_up_does_not_end_a_probation(mesh: Mesh, how: str) -> None:
    """An endpoint on probation (ejected, then let back for one request): a client that left its
    request unanswered, or whose first chunk could not be read (the endpoint never got it), ended
    the probation as a success and reset the ejection's backoff; so did a 503 whose client left
    before its body ended (its answer is a failure)."""
    write_mesh(mesh, two=False)
    app = App("a")
    await start_mesh(mesh, [(CART1, app)])
    frontend = mesh.sidecars["frontend"]
    addr = (mesh.addr(FRONTEND), OUT)
    await asyncio.to_thread(session, addr, [("GET", "/x")])
    (st,) = frontend.balancer.states.values()
    now = frontend.balancer.clock()
    st.ejected_at, st.ejected_until, st.ejections, st.rejoined = now - 5, now - 0.01, 3, True
    reader, writer = await asyncio.open_connection(*addr)
    if how == "left-unanswered":
        app.delay = 3.0  # it hangs still
        writer.write(b"GET /slow HTTP/1.1\r\nHost: cart\r\n\r\n")
        await asyncio.sleep(0.3)
    elif how == "left-a-503":  # answered, a failure: the client reads the head and leaves
        app.stall = True
        writer.write(b"GET /x HTTP/1.1\r\nHost: cart\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 503")
    else:
        writer.write(b"PUT /upload HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 400")
    writer.close()
    await asyncio.sleep(0.3)
    app.unstalled.set()
    assert st.ejected_at is not None and st.ejections >= 3 and st.outstanding == 0, (
        frontend.balancer.describe()
    )


async def test_a_request_body_that_stalls_gets_408(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Service timeout covers a request body (it starts at its end): a client stalled mid-body
    held the request and the app's connection for good; after the body idle timeout (Envoy's
    stream idle timeout, 5 minutes; here shortened) it gets 408."""
    from proxy import http1

    monkeypatch.setattr(http1, "BODY_IDLE_S", 0.5)
    write_mesh(mesh, two=False)
    app = App("cart")
    await start_mesh(mesh, [(CART1, app)])
    reader, writer = await asyncio.open_connection(mesh.addr(FRONTEND), OUT)
    writer.write(b"PUT /r HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head


async def test_retries_stop_when_the_budget_is_spent(mesh: Mesh) -> None:
    from proxy.routers import budget_of

    write_mesh(mesh, two=False)
    app = App("cart")
    await start_mesh(mesh, [(CART1, app)])
    frontend = mesh.sidecars["frontend"]
    budget = budget_of(frontend, "cart.shop:80")
    while budget.try_withdraw():  # an outage has used it all
        pass
    app.fail_next = 100
    before = app.hits
    results = await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("GET", "/r")] * 5)
    assert [s for s, _ in results] == [503] * 5
    # Spent: only what the 5 new requests deposit (20% of them: one retry) may be used.
    assert app.hits - before == 6


async def test_timeout_answers_504(mesh: Mesh) -> None:
    write_mesh(mesh, two=False, timeout="200ms")
    await start_mesh(mesh, [(CART1, App("cart", delay=2.0))])
    began = time.monotonic()
    status, body = (await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("GET", "/t")]))[0]
    assert status == 504 and b"timeout" in body
    assert time.monotonic() - began < 1.5


async def test_the_timeout_covers_connecting_to_the_endpoint(mesh: Mesh) -> None:
    """cart's "sidecar" takes the TCP connection and never completes TLS: the Service's 200 ms
    timeout answers 504, as Envoy's route timeout does; before, three connection attempts of 5 s
    each (--connect-timeout) ran first and the client waited 15 s for a 502."""
    write_mesh(mesh, two=False, timeout="200ms")
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # kept open, never answered

    port = mesh.sidecars["frontend"].inbound_port
    server = await asyncio.start_server(hang, mesh.addr(CART1), port)
    try:
        began = time.monotonic()
        status, body = (await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("GET", "/t")]))[0]
        took = time.monotonic() - began
        assert status == 504 and b"timeout" in body, (status, body)
        assert took < 1.5, took
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_endpoint_changes_apply_to_the_next_request(mesh: Mesh) -> None:
    write_mesh(mesh, two=True)
    one, two = App("one", delay=0.03), App("two")  # the balancer prefers two while it is there
    await start_mesh(mesh, [(CART1, one), (CART2, two)])
    addr = (mesh.addr(FRONTEND), OUT)
    conn = http.client.HTTPConnection(*addr, timeout=10)

    def get() -> bytes:
        conn.request("GET", "/e")
        return conn.getresponse().read()

    assert b"two" in {await asyncio.to_thread(get) for _ in range(20)}
    write_mesh(mesh, two=False)  # cart-2 leaves: the same client connection goes to cart-1 only
    frontend = mesh.sidecars["frontend"]
    for _ in range(100):
        frontend.reload_config()
        dest = frontend.mesh_config().lookup_name("cart.shop:80")
        if dest is not None and len(dest.endpoints) == 1:
            break
        await asyncio.sleep(0.05)
    assert {await asyncio.to_thread(get) for _ in range(10)} == {b"one"}
    conn.close()


@contextlib.asynccontextmanager
async def two_grpc_endpoints(mesh: Mesh) -> AsyncIterator[tuple[dict[int, Server], grpc.aio.Channel]]:
    """gRPC apps "a" (cart-1, the one that drains) and "b" behind their sidecars, the frontend's
    sidecar, and an app channel through it. Unary answers are b"a:..." or b"b:..."."""
    write_mesh(mesh, two=True)
    apps = {CART1: Server("a", delay=0.02), CART2: Server("b", delay=0.02)}
    for host, app in apps.items():
        app.server.add_insecure_port(f"{mesh.addr(host)}:{APP}")
        await app.server.start()
    try:
        for host in apps:
            await mesh.sidecar("carta" if host == CART1 else "cartb", host, identity_of="cart")
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        async with grpc.aio.insecure_channel(f"{mesh.addr(FRONTEND)}:{OUT}") as ch:
            yield apps, ch
    finally:
        for app in apps.values():
            await app.server.stop(0)


def unary_calls(app: Server) -> int:
    return len(app.sizes)  # one per unary call that reached it


async def test_a_draining_endpoint_gets_no_new_grpc_calls_while_its_streams_finish(mesh: Mesh) -> None:
    """RFC 9113 6.8: the draining sidecar sends GOAWAY at once, with long-lived streams open on the
    connection (gRPC watches); the caller's sidecar sends new calls to the other endpoint, none
    fails, the streams already open go on until the drain timeout, and those cut there end
    UNAVAILABLE, as a lost transport does without the mesh (not INTERNAL)."""
    async with two_grpc_endpoints(mesh) as (apps, ch):
        unary = ch.unary_unary("/test.Echo/Unary")  # type: ignore[call-arg]
        streams: dict[bytes, list[Any]] = {b"a": [], b"b": []}
        for _ in range(40):  # long-lived streams on both endpoints
            call = ch.stream_stream("/test.Echo/Bidi")()  # type: ignore[call-arg]
            await call.write(b"x")
            streams[(await call.read()).split(b":")[0]].append(call)
            if len(streams[b"a"]) >= 2 and len(streams[b"b"]) >= 2:
                break
        assert len(streams[b"a"]) >= 2 and len(streams[b"b"]) >= 2
        errors: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    await unary(b"x", timeout=5)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

        started = time.monotonic()
        drain = asyncio.create_task(mesh.sidecars["carta"].drain(timeout=2.5))
        loaders = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.5)  # the GOAWAY and its PING: one round trip here
        before = unary_calls(apps[CART1])
        await asyncio.sleep(1.0)
        assert unary_calls(apps[CART1]) == before, "the draining endpoint still got new calls"
        assert unary_calls(apps[CART2]) > 20
        for call in streams[b"a"] + streams[b"b"]:  # the open streams go on during the drain
            await call.write(b"y")
            assert (await asyncio.wait_for(call.read(), 5)) in (b"a:Y", b"b:Y")
        await drain
        assert time.monotonic() - started >= 2.4  # the streams held it open until the timeout
        stop.set()
        await asyncio.gather(*loaders)
        assert errors == []
        for call in streams[b"a"]:  # cut at the drain timeout
            assert await asyncio.wait_for(call.code(), 5) is grpc.StatusCode.UNAVAILABLE
        for call in streams[b"b"]:
            await call.write(b"z")
            assert await asyncio.wait_for(call.read(), 5) == b"b:Z"
            call.cancel()


async def test_a_drain_between_calls_sends_goaway_too(mesh: Mesh) -> None:
    """No stream open when the drain begins (the calls were short): the connection from the
    caller's sidecar still gets its GOAWAY at once (its reader was waiting for the next request,
    which a sidecar never sends to a draining endpoint: before, it went on sending them)."""
    async with two_grpc_endpoints(mesh) as (apps, ch):
        unary = ch.unary_unary("/test.Echo/Unary")  # type: ignore[call-arg]
        for _ in range(20):  # a connection to each endpoint; then quiet
            await unary(b"x", timeout=5)
        assert unary_calls(apps[CART1]) and unary_calls(apps[CART2])
        await asyncio.sleep(0.3)
        started = time.monotonic()
        drain = asyncio.create_task(mesh.sidecars["carta"].drain(timeout=5))
        await asyncio.sleep(0.5)
        before = unary_calls(apps[CART1])
        answers = [await unary(b"x", timeout=5) for _ in range(40)]
        assert answers == [b"b:x"] * 40 and unary_calls(apps[CART1]) == before
        await drain
        assert time.monotonic() - started < 3  # nothing held it open: closed, not cut at 5 s


async def _delaying_relay(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay: float,
    opened: list[asyncio.StreamWriter],
    cut: list[bool] | None = None,
    heard: list[float] | None = None,
) -> asyncio.Server:
    """A TCP relay adding ``delay`` each way: a network where a close takes time to arrive. Its
    connections' writers go to ``opened`` (to be closed at the end). With ``cut[0]`` set, the
    next bytes from the client are passed on, then the client's connection is reset (a peer
    that read the request and died: no orderly close). ``heard`` gets the time of every read from
    the server (before its delay)."""

    async def pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter | None = None,
        heard: list[float] | None = None,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def later() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                writer.write(data)
                if client is not None and cut is not None and cut[0]:
                    cut[0] = False
                    client.transport.abort()

        sending = asyncio.create_task(later())
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if heard is not None:
                    heard.append(time.monotonic())
                queue.put_nowait((time.monotonic() + delay, data))
        queue.put_nowait((time.monotonic() + delay, b""))
        await sending

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.transport.abort()  # as a closed listener: refused
            return
        opened.extend((writer, up_writer))
        await asyncio.gather(
            pump(reader, up_writer, writer), pump(up_reader, writer, heard=heard), return_exceptions=True
        )
        writer.close()
        up_writer.close()

    return await asyncio.start_server(handle, *listen)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_on_a_pooled_connection_a_draining_peer_closed_goes_elsewhere(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A draining cart sidecar closes its listener and its idle connections; a GET the frontend
    sent on one of them while the close was on its way (20 ms of network) was tried again on a
    fresh connection to the same endpoint, refused there, and answered 502, with another endpoint
    healthy (6 of 6 runs). Nothing was sent: it goes to the other endpoint, as any failed connect.
    A POST went 502 too (RFC 9112 9.3.1: the stream's end alone is no proof it was never read);
    the draining sidecar now says it dropped it unread (an UNREAD frame after its EOF), so it goes
    to the other endpoint as well, once."""
    from tests.integration import mesh_fixture

    write_mesh(mesh, two=True)
    a, b = App("a"), App("b", delay=0.3)  # b slow: the balancer prefers a
    relays, opened, heard = [], [], []  # heard: when carta's sidecar sent something
    for host, app in ((CART1, a), (CART2, b)):
        await app.runner.setup()
        RUNNERS.append(app.runner)
        await web.TCPSite(app.runner, mesh.addr(host), APP).start()
        await mesh.sidecar("carta" if host == CART1 else "cartb", host, identity_of="cart")
        relays.append(
            await _delaying_relay(
                (mesh.addr(host), 15007),
                (mesh.addr(host), 15006),
                0.02,
                opened,
                heard=heard if host == CART1 else None,
            )
        )
    monkeypatch.setattr(mesh_fixture, "INBOUND", 15007)  # the frontend dials the carts through the relays
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    carta = mesh.sidecars["carta"]
    addr = (mesh.addr(FRONTEND), OUT)
    try:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for _ in range(10):  # the frontend's pool holds connections to carta
            await asyncio.to_thread(conn.request, "GET", "/warm")
            (await asyncio.to_thread(conn.getresponse)).read()
        assert a.hits >= 5, (a.hits, b.hits)
        before = len(heard)
        drain = asyncio.create_task(carta.drain(timeout=5))
        for _ in range(5000):  # until carta sent its EOF (the frontend does not know yet)
            if len(heard) > before:
                break
            await asyncio.sleep(0.001)
        assert len(heard) > before
        hits_b = b.hits
        await asyncio.to_thread(
            conn.request, method, "/during-the-drain", b"order" if method == "POST" else None
        )
        resp = await asyncio.to_thread(conn.getresponse)
        body = resp.read()
        conn.close()
        await drain
    finally:
        await mesh.sidecars["frontend"].drain(timeout=0)  # first: its pooled connections use the relays
        for relay in relays:
            relay.close()
        for writer in opened:
            writer.close()
        await asyncio.sleep(0.05)
    assert (resp.status, body) == (200, b"b"), (resp.status, body)
    assert b.hits == hits_b + 1
    if method == "POST":
        assert b.bodies.count(b"order") == 1 and b"order" not in a.bodies, (a.bodies, b.bodies)


async def test_a_post_is_not_sent_again_when_the_peer_sidecar_dies_with_it(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cart sidecar read the POST (its app acted on it) and the connection broke (a reset, as
    a killed sidecar's): the POST is not sent elsewhere (RFC 9112 9.3.1); the client gets 502 and
    the POST reached one app once."""
    from tests.integration import mesh_fixture

    write_mesh(mesh, two=True)
    a, b = App("a"), App("b", delay=0.3)
    relays, opened, cut = [], [], [False]
    for host, app in ((CART1, a), (CART2, b)):
        await app.runner.setup()
        RUNNERS.append(app.runner)
        await web.TCPSite(app.runner, mesh.addr(host), APP).start()
        await mesh.sidecar("carta" if host == CART1 else "cartb", host, identity_of="cart")
        relays.append(
            await _delaying_relay((mesh.addr(host), 15007), (mesh.addr(host), 15006), 0.005, opened, cut)
        )
    monkeypatch.setattr(mesh_fixture, "INBOUND", 15007)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    addr = (mesh.addr(FRONTEND), OUT)
    try:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for _ in range(10):
            await asyncio.to_thread(conn.request, "GET", "/warm")
            (await asyncio.to_thread(conn.getresponse)).read()
        conn.close()
        cut[0] = True
        conn = http.client.HTTPConnection(*addr, timeout=10)
        await asyncio.to_thread(conn.request, "POST", "/pay", b"charge")
        resp = await asyncio.to_thread(conn.getresponse)
        body = resp.read()
        conn.close()
    finally:
        await mesh.sidecars["frontend"].drain(timeout=0)
        for relay in relays:
            relay.close()
        for writer in opened:
            writer.close()
        await asyncio.sleep(0.05)
    assert resp.status == 502, (resp.status, body)
    assert (a.bodies + b.bodies).count(b"charge") == 1


async def test_a_post_is_sent_once_when_the_callee_relays_its_port_as_opaque(mesh: Mesh) -> None:
    """The caller's sidecar speaks HTTP (the Service is not opaque) and pools the connection; the
    callee's relays it as opaque (its pod says so), so its app's close arrives as the stream's
    orderly end. Taking that end as "never read" sent a POST the app had acted on a second time.
    And that end is not a draining sidecar's idle close: the caller answers at once (it waited
    1.5 s for an UNREAD frame that cannot come)."""
    callee_opaque = MESH.format(net=mesh.net, cart2="", timeout="0s").replace(
        "labels: {app: cart}}", 'labels: {app: cart}, annotations: {sidemesh.io/opaque-ports: "8080"}}', 1
    )  # (the pod's annotation, not the Service's)
    mesh.write("workloads.yaml", callee_opaque)
    bodies: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"POST"):
                    bodies.append(body)
                    break  # acted on it, then went away without an answer
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, mesh.addr(CART1), APP)
    try:
        await mesh.sidecar("carta", CART1, identity_of="cart")
        await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
        warm = await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("GET", "/warm")] * 3)
        assert [status for status, _ in warm] == [200, 200, 200]
        conn = http.client.HTTPConnection(mesh.addr(FRONTEND), OUT, timeout=10)
        began = time.monotonic()
        await asyncio.to_thread(conn.request, "POST", "/pay", b"charge")
        status = (await asyncio.to_thread(conn.getresponse)).status
        took = time.monotonic() - began
        conn.close()
    finally:
        server.close()
    assert status == 502 and bodies == [b"charge"], (status, bodies)
    assert took < 0.5, took


# The cart without a sidecar (meshed: false), its Service with the given annotations.
PLAIN_CART = (
    MESH.replace(
        "spec: {{serviceAccount: cart, address: {net}.2, ports: [{{port: 8080}}]}}",
        "spec: {{serviceAccount: cart, address: {net}.2, ports: [{{port: 8080}}], meshed: false}}",
    )
    .replace(
        'annotations: {{sidemesh.io/retries: "2", sidemesh.io/timeout: "{timeout}"}}',
        "annotations: {{{annotations}}}",
    )
    .replace("{cart2}", "")
)


def _call(addr: tuple[str, int], method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*addr, timeout=30)
    try:
        conn.request(method, path, body=b"abc" if method == "POST" else None)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


async def test_a_post_the_service_allows_retrying_is_retried_after_a_pooled_connection_broke(
    mesh: Mesh,
) -> None:
    """retry-non-idempotent: a connection broken after the request went, before the response, is
    retried as a 502 would be, for any method (docs/sidecar.md; Envoy's retry_on: reset). Only a
    fresh connection's break was: most requests ride pooled ones, so the POST got 502."""
    mesh.write(
        "workloads.yaml",
        PLAIN_CART.format(
            net=mesh.net, annotations='sidemesh.io/retries: "2", sidemesh.io/retry-non-idempotent: "true"'
        ),
    )
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"content-length: 3" in head.lower():
                    await reader.readexactly(3)
                seen.append(head.split(b" ", 1)[0])
                served += 1
                if served == 2:  # read, then a crash before answering
                    linger_reset(writer)
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    await mesh.app(CART1, app, APP)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    addr = (mesh.addr(FRONTEND), OUT)
    assert (await asyncio.to_thread(_call, addr, "GET", "/warm"))[0] == 200  # pooled now
    assert await asyncio.to_thread(_call, addr, "POST", "/order") == (200, b"ok")
    assert seen == [b"GET", b"POST", b"POST"]


async def test_reconnecting_after_a_pooled_connection_closed_keeps_to_the_service_timeout(
    mesh: Mesh,
) -> None:
    """The new connection for a request whose pooled one was closed under it dialled for the whole
    connect timeout (5 s) where the Service's timeout was 300 ms (it counts connecting too)."""
    mesh.write("workloads.yaml", PLAIN_CART.format(net=mesh.net, annotations='sidemesh.io/timeout: "300ms"'))

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the second request: closed under it
        writer.close()

    server = await asyncio.start_server(app, mesh.addr(CART1), APP, reuse_address=True)
    await mesh.sidecar("frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",))
    addr = (mesh.addr(FRONTEND), OUT)
    assert (await asyncio.to_thread(_call, addr, "GET", "/warm"))[0] == 200  # pooled now
    server.close()
    await server.wait_closed()
    # New connections now hang: a listener whose accept queue is full drops the SYNs.
    black = socket.socket()
    black.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    black.bind((mesh.addr(CART1), APP))
    black.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    try:
        for s in fillers:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((mesh.addr(CART1), APP))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        status, _ = await asyncio.to_thread(_call, addr, "GET", "/x")
        took = time.monotonic() - began
        assert status == 504 and took < 1.5, (status, took)
    finally:
        for s in fillers:
            s.close()
        black.close()


async def test_a_connect_failure_is_not_dialled_again_when_there_is_no_other_endpoint(mesh: Mesh) -> None:
    """One endpoint, whose sidecar port takes TCP but never answers TLS: the request (HTTP/1.1, and
    a gRPC call) waited three connect timeouts (the same endpoint dialled three times) for the
    502 / UNAVAILABLE the first one gave."""
    import dataclasses
    import datetime as dt

    write_mesh(mesh, two=False)
    frontend = await mesh.sidecar(
        "frontend", FRONTEND, outbound=(f"{mesh.addr(FRONTEND)}:{OUT}=cart.shop:80",)
    )
    object.__setattr__(
        frontend, "config", dataclasses.replace(frontend.config, connect_timeout=dt.timedelta(seconds=0.5))
    )
    dialled: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(writer)

    server = await asyncio.start_server(silent, mesh.addr(CART1), frontend.inbound_port)
    try:
        [(status, _)] = await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("GET", "/x")])
        assert status == 502 and len(dialled) == 1, (status, len(dialled))
        async with grpc.aio.insecure_channel(f"{mesh.addr(FRONTEND)}:{OUT}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/shop.Cart/Get")(b"", timeout=20)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and len(dialled) == 2, len(dialled)
    finally:
        for writer in dialled:
            writer.close()
        server.close()


async def test_requests_go_to_the_other_endpoint_when_one_app_stopped(mesh: Mesh) -> None:
    """One of two apps stops, its sidecar stays (the app's container restarting): the stopped
    app's sidecar answers another sidecar 502 saying the app never saw the request, and the
    caller's sidecar sends it to the other endpoint, a POST too (as a failed connect; the 502 went
    to the client, and POSTs failed until the balancer had ejected the endpoint). An app cannot
    say so itself: the field is taken out of its answers."""
    write_mesh(mesh, two=True)
    a, b = App("a"), App("b")
    await start_mesh(mesh, [(CART1, a), (CART2, b)])
    addr = (mesh.addr(FRONTEND), OUT)
    before = await asyncio.to_thread(session, addr, [("POST", "/r")] * 10)
    assert {body for _, body in before} == {b"a", b"b"}
    await a.runner.cleanup()
    RUNNERS.remove(a.runner)
    answers = await asyncio.gather(
        *(asyncio.to_thread(session, addr, [(method, "/r")]) for method in ["POST", "GET"] * 10)
    )
    assert [answer[0] for answer in answers] == [(200, b"b")] * 20


async def test_an_app_cannot_say_it_never_saw_a_request(mesh: Mesh) -> None:
    """An app's own 502 with the sidecars' field: the field does not reach the caller's sidecar,
    and the POST the app answered is not sent again."""
    write_mesh(mesh, two=False)

    class Saying(App):
        async def handle(self, request: web.Request) -> web.StreamResponse:
            self.hits += 1
            await request.read()
            return web.Response(status=502, text="mine", headers={"sidemesh-unprocessed": "1"})

    app = Saying("cart")
    await start_mesh(mesh, [(CART1, app)])
    answer = (await asyncio.to_thread(session, (mesh.addr(FRONTEND), OUT), [("POST", "/r")]))[0]
    assert answer == (502, b"mine") and app.hits == 1
