"""Attacks on a running sidecar (issue 9), each refused before anything reaches the application.

The attacker talks straight to the cart sidecar's inbound port with real TLS clients. Every test
also checks that the cart application never saw a connection: refusing late (after the bytes were
delivered) would be no refusal at all. The CA-side attacks (a CSR for another identity, wrong-
audience tokens) are in test_ca.py and test_ca_kubernetes.py; secure naming is in test_proxy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy import detect, framing
from proxy.sidecar import Sidecar
from sidemesh.identity import tls
from sidemesh.spiffe import SpiffeId, WorkloadId
from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import INBOUND, Mesh, new_mesh
from tests.support import pki

CART = 2
FRONTEND_ID = WorkloadId("shop", "frontend").spiffe_id("cluster.local")
STRANGER_ID = WorkloadId("shop", "stranger").spiffe_id("cluster.local")


class CountingApp:
    def __init__(self) -> None:
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data.upper())
                await writer.drain()
        writer.close()


@pytest.fixture
async def target(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[tuple[Mesh, Sidecar, CountingApp]]:
    m = new_mesh(await start_ca(), tmp_path)
    app = CountingApp()
    await m.app(CART, app)
    cart = await m.sidecar("cart", CART)
    yield m, cart, app
    await m.close()


async def _attempt(mesh: Mesh, ctx: ssl.SSLContext | None, port: int = 8080) -> bytes:
    """Connect (TLS when ``ctx``), ask for ``port``, send a payload; whatever comes back."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(mesh.addr(CART), INBOUND, ssl=ctx, server_hostname="" if ctx else None), 5
        )
    except (ssl.SSLError, ConnectionError):
        return b""  # refused during the handshake
    try:
        if ctx is not None:
            writer.write(framing.open_frame(port) + framing.data_header(6) + b"secret" + framing.EOF_FRAME)
        else:
            writer.write(b"secret")
            writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


def _refused(app: CountingApp, reply: bytes) -> None:
    assert b"SECRET" not in reply, "the application answered the attacker"
    assert app.connections == 0, "the attacker's connection reached the application"


async def test_a_valid_client_is_served(target: tuple[Mesh, Sidecar, CountingApp]) -> None:
    # The control experiment: the same client code with a legitimate certificate gets through, so
    # the refusals below are the sidecar's doing and not the test client's.
    mesh, _, app = target
    reply = await _attempt(mesh, tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID)))
    assert b"SECRET" in reply and app.connections == 1


async def test_plaintext_to_a_strict_workload(target: tuple[Mesh, Sidecar, CountingApp]) -> None:
    mesh, cart, app = target
    _refused(app, await _attempt(mesh, None))
    assert cart.metrics.connections.labels("inbound", "refused")._value.get() == 1


async def test_client_certificate_from_another_trust_domain(
    target: tuple[Mesh, Sidecar, CountingApp], tmp_path: Path
) -> None:
    mesh, cart, app = target
    foreign = pki.make_authority(tmp_path / "foreign", trust_domain="evil.example")
    svid = pki.make_svid(foreign, SpiffeId.parse("spiffe://evil.example/ns/shop/sa/frontend"))
    _refused(
        app, await _attempt(mesh, tls.client_context(svid.with_bundle(pki.lite(mesh.ca.authority.roots))))
    )
    failures = cart.metrics.tls_failures.collect()
    assert sum(x.value for m in failures for x in m.samples if x.name.endswith("_total")) >= 1


async def test_self_signed_client_certificate_naming_an_allowed_identity(
    target: tuple[Mesh, Sidecar, CountingApp],
) -> None:
    mesh, _, app = target
    svid = pki.self_signed_svid(FRONTEND_ID).with_bundle(pki.lite(mesh.ca.authority.roots))
    _refused(app, await _attempt(mesh, tls.client_context(svid)))


async def test_expired_client_certificate_from_our_own_ca(target: tuple[Mesh, Sidecar, CountingApp]) -> None:
    mesh, _, app = target
    _refused(app, await _attempt(mesh, tls.client_context(pki.expired_svid(mesh.ca.authority, FRONTEND_ID))))


async def test_valid_certificate_for_an_identity_the_policy_does_not_allow(
    target: tuple[Mesh, Sidecar, CountingApp],
) -> None:
    mesh, cart, app = target
    reply = await _attempt(mesh, tls.client_context(pki.make_svid(mesh.ca.authority, STRANGER_ID)))
    _refused(app, reply)
    assert reply[:1] == bytes([framing.DENY]) and b"cart-allow-frontend" in reply  # told why
    assert cart.metrics.denials.labels("shop/cart-allow-frontend")._value.get() == 1


@pytest.mark.parametrize("cipher", ["AES128-SHA", "ECDHE-ECDSA-AES128-GCM-SHA256"])
async def test_tls_1_2_downgrade_with_a_valid_certificate(
    target: tuple[Mesh, Sidecar, CountingApp], cipher: str
) -> None:
    mesh, _, app = target
    ctx = tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID))
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)  # weak and non-forward-secret, then a strong 1.2 suite: both refused
    _refused(app, await _attempt(mesh, ctx))


async def test_mesh_certificate_without_the_mesh_alpn_is_plaintext_to_a_strict_workload(
    target: tuple[Mesh, Sidecar, CountingApp],
) -> None:
    # TLS with a valid certificate but not speaking sidemesh/1 (e.g. an app holding a stolen SVID
    # and talking h2): it is not a sidecar, so strict mode refuses it like any plaintext.
    mesh, _, app = target
    ctx = tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID))
    ctx.set_alpn_protocols(["h2"])
    _refused(app, await _attempt(mesh, ctx))


async def test_the_mesh_alpn_hidden_elsewhere_in_the_client_hello_is_not_the_mesh(
    target: tuple[Mesh, Sidecar, CountingApp],
) -> None:
    """Detection looks for the ALPN bytes in the ClientHello; a client that puts them in its SNI
    and offers no ALPN negotiates none: it is not a sidecar speaking the mesh's protocol (Envoy
    picks the filter chain by the negotiated ALPN), whatever certificate it holds."""
    mesh, cart, app = target
    ctx = tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID), alpn=[])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(mesh.addr(CART), INBOUND, ssl=ctx, server_hostname=tls.ALPN), 5
        )
        writer.write(framing.open_frame(8080) + framing.data_header(6) + b"secret" + framing.EOF_FRAME)
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    except (ssl.SSLError, ConnectionError):
        reply = b""
    _refused(app, reply)
    refused = cart.metrics.registry.get_sample_value(
        "sidemesh_proxy_tls_handshake_failures_total", {"direction": "inbound", "reason": "wrong_alpn"}
    )
    assert refused == 1


@pytest.mark.parametrize("port", [15000, 15020, "admin", "health"])
async def test_allowed_peer_cannot_reach_the_proxys_own_ports(
    target: tuple[Mesh, Sidecar, CountingApp], port: int | str
) -> None:
    # An allowed identity asks the sidecar to deliver to its admin (15000) or health (15020) port,
    # or to the ports they were configured on instead (the health port's POST /quitquitquit
    # stops the sidecar, and it answers loopback callers, as the sidecar's deliveries are).
    mesh, cart, app = target
    number = cart.ports[port] if isinstance(port, str) else port
    reply = await _attempt(
        mesh, tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID)), port=number
    )
    _refused(app, reply)
    assert reply[:1] == bytes([framing.DENY]) and b"proxy's own" in reply


async def test_one_attackers_refusal_does_not_disturb_a_valid_client(
    target: tuple[Mesh, Sidecar, CountingApp],
) -> None:
    mesh, _, app = target
    good = tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID))
    bad = tls.client_context(pki.self_signed_svid(FRONTEND_ID).with_bundle(pki.lite(mesh.ca.authority.roots)))
    replies = await asyncio.gather(*[_attempt(mesh, bad) for _ in range(20)], _attempt(mesh, good))
    assert all(b"SECRET" not in r for r in replies[:-1])
    assert b"SECRET" in replies[-1] and app.connections == 1


async def test_a_caller_of_another_trust_domain_signed_by_a_root_in_the_bundle_is_refused(
    target: tuple[Mesh, Sidecar, CountingApp], caplog: pytest.LogCaptureFixture
) -> None:
    """Signed by a CA in the bundle but of another trust domain (a shared root that names no trust
    domain): an SVID is valid only under its own trust domain's bundle (X509-SVID 5; go-spiffe and
    Envoy refuse it), so it is refused as the handshake ends, told nothing, whatever the policy
    (it was an authenticated caller that the allow-all default let in)."""
    mesh, cart, app = target
    other = SpiffeId.parse("spiffe://other.example/ns/shop/sa/frontend")
    with caplog.at_level(logging.WARNING, logger="sidemesh.proxy"):
        reply = await _attempt(mesh, tls.client_context(pki.make_svid(mesh.ca.authority, other)))
    _refused(app, reply)
    assert reply == b""  # no DENY frame: refused before any policy
    assert cart.metrics.tls_failures.labels("inbound", "other_trust_domain")._value.get() == 1
    assert cart.metrics.denials.labels("default")._value.get() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    told = [r.reason for r in caplog.records if r.getMessage() == "inbound connection refused"]  # type: ignore[attr-defined]
    assert told and "is not of trust domain cluster.local" in told[0], told


async def test_a_connection_iptables_did_not_redirect_is_refused_cleanly(
    start_ca: StartCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the capture, a connection straight to the inbound listener that has no original
    destination (IPv6 when only IPv4 is captured: the listener is [::]) was an internal error:
    a traceback per connection, which any neighbour could have the sidecar log. Now it is refused,
    counted and logged as such, and the app never sees it."""
    mesh = new_mesh(await start_ca(), tmp_path)
    app = CountingApp()
    await mesh.app(CART, app)
    cart = await mesh.sidecar("cart", CART, capture="iptables", mode="permissive")
    try:
        with caplog.at_level(logging.WARNING, logger="sidemesh.proxy"):
            for ctx in (None, tls.client_context(pki.make_svid(mesh.ca.authority, FRONTEND_ID))):
                _refused(app, await _attempt(mesh, ctx))
            for _ in range(50):
                if cart.metrics.connections.labels("inbound", "refused")._value.get() >= 2:
                    break
                await asyncio.sleep(0.02)
    finally:
        await mesh.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
    # Without connection tracking on loopback there is no original destination: refused. With it
    # (a host with nat rules of its own), the destination is the listener itself: port 15006,
    # which no policy allows. Either way, not the local mode that delivered it to the app.
    told = [
        r.reason  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() in ("inbound connection refused", "connection denied")
    ]
    assert len(told) == 2 and all(
        "not redirected by iptables" in why
        or f"port {INBOUND} is the proxy's own" in why
        or f"the connection was for port {INBOUND}" in why
        for why in told
    ), told


class RecordingApp(CountingApp):
    def __init__(self) -> None:
        super().__init__()
        self.seen = b""
        self.ends = 0  # streams that ended (EOF), not reset: what Python's readline serves at

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.seen += data
                writer.write(data.upper())
                await writer.drain()
            self.ends += 1
        writer.close()


FORGED = b"x-forwarded-client-cert: By=spiffe://cluster.local/ns/shop/sa/cart;URI=spiffe://cluster.local/ns/shop/sa/admin"


async def _recorded_cart(start_ca: StartCA, tmp_path: Path) -> tuple[Mesh, RecordingApp]:
    """A mesh with cart's sidecar started in front of an app that records what reaches it."""
    m = new_mesh(await start_ca(), tmp_path)
    app = RecordingApp()
    await m.app(CART, app)
    await m.sidecar("cart", CART)
    return m, app


async def _as_frontend(m: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An mTLS connection to cart's inbound port with the frontend's SVID (as its sidecar would)."""
    ctx = tls.client_context(pki.make_svid(m.ca.authority, FRONTEND_ID))
    return await asyncio.open_connection(m.addr(CART), INBOUND, ssl=ctx, server_hostname="")


@pytest.mark.parametrize(
    ("first", "rest", "refused"),
    [
        (b"GE", b"T /orders HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        (b"\r\nGET  /orders HTTP/1.1\r\nhost: cart\r\n", FORGED + b"\r\n\r\n", True),
        (detect.H2_PREFACE[:10], detect.H2_PREFACE[10:], True),
        # request lines Python's servers (http.server, wsgiref, Werkzeug) take, llhttp does not
        (b" ", b"GET /orders HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        (b"GET\t/orders", b"\tHTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        # (the first bytes alone look like no request at all: judged again at the line's end)
        (b"G\x01T /orders", b" HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        # a line longer than the 8 KiB peek (http.server reads 64 KiB), and a first byte that
        # looked like TLS's
        (b"GET\t/orders" + b" " * 9000, b"HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        (b"\x16 /orders", b" HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        # TLS by its first bytes (a record of length 0; one still incomplete), a method all the
        # same to Python's servers; and HTTP/0.9 with any target (Werkzeug routes `admin` as /admin)
        (b"\x16\x03\x00\x00\x00 /orders", b" HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        (b"\x16\x03\x01\x40\x00 /orders", b" HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        (b"GET", b" admin\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n", True),
        # the end of the stream before the line's LF: Python's readline serves the line as it is
        (b"GET /admin", b" HTTP/1.0", True),
        (b"POST", b" /admin", False),  # (HTTP/0.9 is GET only: not a request to them)
        (b"\x00\x01bin", b" ary\r\nframe two\r\n", False),  # a binary protocol: opaque indeed
        (b"*1\r\n$4\r\n", b"PING\r\n", False),  # Redis: opaque indeed
    ],
)
async def test_http_under_the_opaque_hint_is_refused(
    start_ca: StartCA,
    tmp_path: Path,
    first: bytes,
    rest: bytes,
    refused: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sidecar that says opaque (OPEN's hint) is believed: the bytes went to the app unparsed, so
    a caller holding an allowed identity could send an HTTP request with an x-forwarded-client-cert
    naming anyone, and an app that trusts the header (the sidecar sets it) was lied to. Its first
    bytes are now classified as the sidecar's own detection would, before any goes on. The refusal
    is logged with its reason (an older client sidecar, whose detection missed a request, sends
    just this: the reset was all there was to go by)."""
    caplog.set_level(logging.WARNING)
    m, app = await _recorded_cart(start_ca, tmp_path)
    try:
        reader, writer = await _as_frontend(m)
        try:
            writer.write(
                framing.open_frame(8080, framing.HINT_OPAQUE) + framing.data_header(len(first)) + first
            )
            await writer.drain()
            await asyncio.sleep(0.2)  # (the first bytes arrive alone)
            reply = b""
            with contextlib.suppress(ConnectionError, ssl.SSLError):  # (a refusal resets)
                writer.write(framing.data_header(len(rest)) + rest + framing.EOF_FRAME)
                await writer.drain()
                reply = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        if refused:
            assert b"\n" not in app.seen and b"X-FORWARDED" not in reply, (app.seen, reply)
            logged = [r.__dict__ for r in caplog.records if r.getMessage() == "connection refused"]
            assert logged and "sent on a connection relayed as opaque" in logged[0]["reason"], logged
            registry = m.sidecars["cart"].metrics.registry
            labels = {"direction": "inbound", "decision": "refused"}
            for _ in range(20):  # (counted when the relay has closed)
                if registry.get_sample_value("sidemesh_proxy_connections_total", labels):
                    break
                await asyncio.sleep(0.05)
            assert registry.get_sample_value("sidemesh_proxy_connections_total", labels) == 1
        else:
            assert app.seen == first + rest and first.upper() in reply and rest.upper() in reply
    finally:
        await m.close()


@pytest.mark.parametrize(
    "line",
    [
        b"GET\t/orders\tHTTP/1.1\r\n",
        b" GET /orders HTTP/1.1\r\n",
        b"GET /orders HTTP/1.1\r\r\n",
        b"GET\x0b/orders\x0cHTTP/1.1\r\n",
        b"GET\x1c/orders\xa0HTTP/1.1\r\n",
        b"GET\x85/orders HTTP/1.1\r\n",
        b"GET\t/orders\r\n",  # HTTP/0.9 to them: the headers are read all the same
        b"GET /orders\rHTTP/1.1\r\n",
        b"GET /orders HTTP/1.1\r \r\n",
        b"GET(x) /orders HTTP/1.1\r\n",  # any first word is the method (wsgiref calls the app)
    ],
)
async def test_request_lines_only_lenient_servers_take_never_reach_the_app_unparsed(
    start_ca: StartCA, tmp_path: Path, line: bytes
) -> None:
    """Python's servers (http.server, so wsgiref, Werkzeug's and Django's development servers) split
    a request line on any whitespace and strip every CR: these lines are requests to them. Detection
    took them for another protocol, and they reached the app byte for byte, with the
    x-forwarded-client-cert the caller wrote naming anyone. They are HTTP now, and the sidecar's
    parser refuses them (400), as Envoy's does."""
    m, app = await _recorded_cart(start_ca, tmp_path)
    try:
        reader, writer = await _as_frontend(m)
        try:
            request = line + b"host: cart\r\n" + FORGED + b"\r\n\r\n"
            writer.write(framing.open_frame(8080) + framing.data_header(len(request)) + request)
            writer.write(framing.EOF_FRAME)
            await writer.drain()
            reply = b""
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                reply = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert app.seen == b"" and app.connections == 0, app.seen
        assert b"HTTP/1.1 400 " in reply and b"sidemesh-denied-reason" in reply, reply
    finally:
        await m.close()


@pytest.mark.parametrize("ending", ["request", "half-close"])
async def test_a_plaintext_request_after_the_detection_timeout_is_refused(
    start_ca: StartCA, tmp_path: Path, ending: str
) -> None:
    """Permissive mode: a plaintext client waits out the detection, then sends HTTP with an
    x-forwarded-client-cert naming anyone. Relayed as opaque, it reached the app unparsed: an app
    that trusts the header (the sidecar sets it for mTLS callers) took a plaintext caller for
    them. What is relayed as opaque on a port not configured so is checked as it goes on. Or a
    request line without its LF, then a half-close: Python's servers serve it as it is (readline
    at the end of the stream), and the FIN went on to the app."""
    m = new_mesh(
        await start_ca(),
        tmp_path,
        "apiVersion: sidemesh.io/v1alpha1\nkind: ServiceAuthorization\nmetadata: {name: open, namespace: shop}\n"
        "spec:\n  rules:\n  - from: [{unauthenticated: true}]\n",
    )
    app = RecordingApp()
    await m.app(CART, app)
    await m.sidecar("cart", CART, mode="permissive")
    try:
        reader, writer = await asyncio.open_connection(m.addr(CART), INBOUND)
        reply = b""
        try:
            await asyncio.sleep(1.5)  # (detection: 1 s)
            with contextlib.suppress(ConnectionError):
                if ending == "request":
                    writer.write(b"GET /orders HTTP/1.1\r\nhost: cart\r\n" + FORGED + b"\r\n\r\n")
                else:
                    writer.write(b"GET /admin HTTP/1.0")
                    writer.write_eof()
                await writer.drain()
                reply = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert b"\n" not in app.seen and b"X-FORWARDED" not in reply, (app.seen, reply)
        await asyncio.sleep(0.2)
        assert app.ends == 0  # reset, not ended: a cut-short request line is never served
    finally:
        await m.close()


async def test_a_stream_that_ended_undecided_is_not_waited_on_and_refused_once(
    start_ca: StartCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After OPEN without a protocol hint, a stream that ends before detection can decide (`hello
    world`, then EOF) spun a core until the detection timeout (1 s), from any caller with a mesh
    identity, before its policy was even asked. It is decided at once now. And a request line the
    end cut short, followed in the same read by more DATA, was refused and logged twice."""
    caplog.set_level(logging.WARNING)
    m, app = await _recorded_cart(start_ca, tmp_path)
    try:
        reader, writer = await _as_frontend(m)
        began = time.process_time(), time.monotonic()
        writer.write(framing.open_frame(8080) + framing.data_header(11) + b"hello world" + framing.EOF_FRAME)
        reply = await asyncio.wait_for(reader.read(), 5)
        cpu, wall = time.process_time() - began[0], time.monotonic() - began[1]
        writer.close()
        assert b"HELLO WORLD" in reply and wall < 0.5 and cpu < 0.5, (reply, wall, cpu)
        reader, writer = await _as_frontend(m)
        writer.write(framing.open_frame(8080, framing.HINT_OPAQUE) + framing.data_header(10) + b"GET /admin")
        await writer.drain()
        await asyncio.sleep(0.3)
        rest = b"\r\nhost: cart\r\n\r\n"
        writer.write(
            framing.data_header(9) + b" HTTP/1.0" + framing.EOF_FRAME + framing.data_header(len(rest)) + rest
        )
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.sleep(0.2)
        assert len([r for r in caplog.records if r.getMessage() == "connection refused"]) == 1
        assert app.ends == 1  # (the first connection's; the second was reset)
    finally:
        await m.close()


async def test_data_after_the_callers_eof_frame_is_a_framing_error_on_the_http_path(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """The opaque relay resets a peer that sends DATA after its EOF frame (docs/sidecar.md); the
    HTTP path's pipe took it, and served it as the request's body when it came in the same read."""
    m, app = await _recorded_cart(start_ca, tmp_path)
    try:
        reader, writer = await _as_frontend(m)
        head = b"POST /orders HTTP/1.1\r\nhost: cart\r\ncontent-length: 10\r\n\r\n"
        writer.write(
            framing.open_frame(8080, framing.HINT_HTTP1)
            + framing.data_header(len(head))
            + head
            + framing.EOF_FRAME
            + framing.data_header(10)
            + b"0123456789"
        )
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.sleep(0.2)
        assert b"0123456789" not in app.seen, app.seen
    finally:
        await m.close()


@pytest.mark.parametrize("hint", [framing.HINT_OPAQUE, framing.HINT_HTTP1])
async def test_a_flood_of_empty_data_frames_is_refused(start_ca: StartCA, tmp_path: Path, hint: int) -> None:
    """An empty DATA frame carries nothing and no sidecar sends one; decoding a flood of them cost
    ~65x the CPU per byte of real DATA, with no read limit to pause it (HTTP/2's empty-frame
    flood). More than 10 in a row end the connection."""
    m, _ = await _recorded_cart(start_ca, tmp_path)
    try:
        reader, writer = await _as_frontend(m)
        writer.write(framing.open_frame(8080, hint) + framing.data_header(0) * 11)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not waiting for more
        writer.close()
    finally:
        await m.close()


@pytest.mark.parametrize(
    "first",
    [framing.data_header(0) * 11, framing.data_header(6) + b"before", framing.EOF_FRAME],
    ids=["empty-data", "data", "eof"],
)
async def test_nothing_but_open_comes_first_on_a_mesh_connection(
    start_ca: StartCA, tmp_path: Path, first: bytes
) -> None:
    """DATA before OPEN was taken (buffered before any policy was asked, 90 MB of empty frames from
    a caller the policy denies) and delivered to the app ahead of what followed OPEN; a connection
    that ended before OPEN held its slot for the 10 s OPEN timeout."""
    m, app = await _recorded_cart(start_ca, tmp_path)
    try:
        reader, writer = await _as_frontend(m)
        began = time.monotonic()
        writer.write(first)
        writer.write(framing.open_frame(8080, framing.HINT_OPAQUE) + framing.data_header(5) + b"after")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert time.monotonic() - began < 2
        await asyncio.sleep(0.2)
        assert b"before" not in app.seen and b"after" not in app.seen, app.seen
    finally:
        await m.close()
