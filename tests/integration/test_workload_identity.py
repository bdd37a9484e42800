"""The workload side against a real CA: SVIDs, mTLS with the contexts, rotation, outages, bundles."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from ca import keys, templates
from sidemesh.identity import tls
from sidemesh.identity.client import CAClient, CAClientError
from sidemesh.identity.rotation import renewal_time
from sidemesh.identity.svid import (
    SVID,
    UNREADABLE,
    SvidError,
    foreign_roots,
    load_bundle,
    own_roots,
    root_trust_domains,
)
from sidemesh.identity.workload import WorkloadIdentity, token_from_file
from sidemesh.spiffe import SpiffeId, WorkloadId
from tests.integration.conftest import RunningCA, StartCA
from tests.support import pki
from tests.support.clock import FakeClock

FRONTEND = WorkloadId("shop", "frontend").spiffe_id("cluster.local")
CART = WorkloadId("shop", "cart").spiffe_id("cluster.local")


class EchoServer:
    """A TLS echo server that records each client's SPIFFE ID (or the handshake error)."""

    def __init__(self, context: Callable[[], ssl.SSLContext]) -> None:
        self.context = context
        self.peers: list[SpiffeId] = []
        self.errors: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.context())
            self.peers.append(tls.peer_spiffe_id(writer.get_extra_info("ssl_object"), "cluster.local"))
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ssl.SSLError, ConnectionError) as exc:
            self.errors.append(str(exc))
        finally:
            writer.close()

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)


async def connect(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None), 5
    )


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


@pytest.fixture
async def ca(start_ca: StartCA) -> RunningCA:
    return await start_ca()


@pytest.fixture
async def identities(ca: RunningCA) -> AsyncIterator[Callable[..., WorkloadIdentity]]:
    made: list[WorkloadIdentity] = []

    def make(spiffe_id: SpiffeId, token: str, **kw: object) -> WorkloadIdentity:
        wi = WorkloadIdentity(spiffe_id, ca.client(), lambda: token, **kw)  # type: ignore[arg-type]
        made.append(wi)
        return wi

    yield make
    for wi in made:
        await wi.stop()
        await wi.ca.close()


async def test_two_workloads_talk_mtls_and_see_each_others_identity(
    identities: Callable[..., WorkloadIdentity],
) -> None:
    cart = identities(CART, "cart-token")
    frontend = identities(FRONTEND, "frontend-token")
    for wi in (cart, frontend):
        await wi.start()
        await asyncio.wait_for(wi.wait_ready(), 10)
    assert cart.ready and cart.state == "valid"
    async with EchoServer(cart.server_context) as server:
        reader, writer = await connect(server.port, frontend.client_context())
        assert await roundtrip(reader, writer, b"hello cart") == b"hello cart"
        ssl_object = writer.get_extra_info("ssl_object")
        assert (
            tls.peer_spiffe_id(ssl_object, "cluster.local") == CART
        )  # secure naming: the client checks who answered
        assert ssl_object.selected_alpn_protocol() == "sidemesh/1"
        assert ssl_object.version() == "TLSv1.3"
        # The loop moved those bytes through the C methods themselves (no Python frame per record).
        assert isinstance(ssl_object, tls.DirectSSLObject)
        own = vars(ssl_object)
        assert all(own[name].__self__ is own["_sslobj"] for name in ("read", "write", "pending"))
        writer.close()
    assert server.peers == [FRONTEND]


async def _refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> EchoServer:
    async with EchoServer(lambda: server_ctx) as server:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):  # noqa: PT012
            # TLS 1.3: a refused client certificate shows up on the first read, not in connect().
            reader, writer = await connect(server.port, client_ctx)
            await roundtrip(reader, writer, b"x")
        await asyncio.sleep(0.05)
    assert server.peers == []
    return server


def _client_without_cert(bundle: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle.decode())
    return ctx


async def test_negative_twins(ca: RunningCA, tmp_path: Path) -> None:
    cart = pki.make_svid(ca.authority, CART)
    server_ctx = tls.server_context(cart)
    # No client certificate.
    await _refused(server_ctx, _client_without_cert(ca.bundle))
    # A client certificate from another CA (another trust domain).
    foreign = pki.make_authority(tmp_path / "foreign", trust_domain="evil.example")
    foreign_svid = pki.make_svid(foreign, SpiffeId.parse("spiffe://evil.example/ns/shop/sa/frontend"))
    await _refused(server_ctx, tls.client_context(foreign_svid.with_bundle(pki.lite(ca.authority.roots))))
    # Self-signed.
    await _refused(
        server_ctx,
        tls.client_context(pki.self_signed_svid(FRONTEND).with_bundle(pki.lite(ca.authority.roots))),
    )
    # Expired (issued by our own CA, two hours ago, for one hour).
    expired = pki.expired_svid(ca.authority, FRONTEND)
    await _refused(server_ctx, tls.client_context(expired))
    # A valid client certificate, but TLS 1.2 (a downgrade attempt): only TLS 1.3 is spoken.
    tls12 = tls.client_context(pki.make_svid(ca.authority, FRONTEND))
    tls12.minimum_version = ssl.TLSVersion.TLSv1_2
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.set_ciphers("AES128-SHA")  # a weak, non-forward-secret suite
    await _refused(server_ctx, tls12)
    # And the client side refuses a server from another CA.
    await _refused(
        tls.server_context(foreign_svid), tls.client_context(pki.make_svid(ca.authority, FRONTEND))
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("uris", "bend", "why"),
    [
        ([str(CART)], {"ca": True}, "is a CA"),
        ([str(CART)], {"key_cert_sign": True}, "keyCertSign or cRLSign"),
        ([str(CART)], {"crl_sign": True}, "keyCertSign or cRLSign"),
        (["spiffe://cluster.local"], {}, "names a trust domain"),
        (["spiffe://a/x", "spiffe://a/y"], {}, "exactly one URI SAN"),
        ([], {}, "exactly one URI SAN"),
        (["https://cart.shop"], {}, "not a SPIFFE ID"),
        # X509-SVID 4.1 and 4.3 (py-spiffe and rust-spiffe refuse these; OpenSSL lets them by)
        ([str(CART)], {"digital_signature": False}, "without digitalSignature"),
        ([str(CART)], {"key_usage": False}, "has no key usage"),
        ([str(CART)], {"basic_constraints": False}, "basicConstraints with cA false"),
    ],
)
def test_a_peer_certificate_must_be_a_leaf_svid(
    tmp_path: Path, uris: list[str], bend: dict[str, bool], why: str
) -> None:
    """X509-SVID section 5.2: what OpenSSL's chain check lets through and the validator refuses."""
    authority = pki.make_authority(tmp_path)
    with pytest.raises(tls.PeerIdentityError, match=why):
        tls.spiffe_id_from_der(_der(pki.leaf_with(authority, uris, **bend)))
    assert tls.spiffe_id_from_der(_der(pki.leaf_with(authority, [str(CART)]))) == CART
    with pytest.raises(tls.PeerIdentityError, match="no certificate"):
        tls.spiffe_id_from_der(None)
    with pytest.raises(tls.PeerIdentityError, match="not a leaf"):
        tls.spiffe_id_from_der(b"not DER")


@pytest.mark.parametrize(
    ("other_name", "expected"),
    [
        # An x400Address beside the URI (cryptography raised UnsupportedGeneralNameType, which once
        # escaped as a crash): other name types are allowed beside the one URI, as Go's x509 reads it.
        (b"\xa3\x02\x30\x00", CART),
        (b"\x87\x04\x7f\x00\x00\x01", CART),  # an iPAddress
        # Not DER: a name running past the SAN's end, a URI that is not ASCII.
        (b"\x82\x0aa.example", "extensions cannot be read"),
        (b"\x86\x02\xc3\xa9", "extensions cannot be read"),
    ],
)
def test_a_peer_san_with_other_names_is_read_and_a_malformed_one_refused_cleanly(
    tmp_path: Path, other_name: bytes, expected: SpiffeId | str
) -> None:
    """The leaf checks read the SAN's URIs (signed by a trusted CA): a name of another type beside
    the one URI is passed over; bytes that are not DER are the peer identity refusal the sidecar
    reacts to, never an exception that escapes the connection's handling."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    from ca import der

    authority = pki.make_authority(tmp_path)
    names = der.tlv(0x86, str(CART).encode()) + other_name
    san = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.17"), der.tlv(der.SEQUENCE, names))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.cert.subject)
        .public_key(templates.new_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(san, critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .sign(authority.key, hashes.SHA256())
    )
    if isinstance(expected, SpiffeId):
        assert tls.spiffe_id_from_der(_der(cert)) == expected
    else:
        with pytest.raises(tls.PeerIdentityError, match=expected):
            tls.spiffe_id_from_der(_der(cert))


async def test_a_ca_certificate_presented_as_a_client_identity_is_refused(ca: RunningCA) -> None:
    """A certificate from the trusted CA that is itself a CA (as a signing certificate carrying a
    workload's URI SAN would be) passes OpenSSL's chain check as a client certificate; the server
    must still not take it for that workload."""
    cart = pki.make_svid(ca.authority, CART)
    key = templates.new_key()
    cert = pki.leaf_with(ca.authority, [str(FRONTEND)], ca=True, key_cert_sign=True, key=key)
    client = SVID.of(FRONTEND, key, (cert, *ca.authority.chain), ca.authority.roots)
    async with EchoServer(lambda: tls.server_context(cart)) as server:
        reader, writer = await connect(server.port, tls.client_context(client))
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await roundtrip(reader, writer, b"x")
        writer.close()
        for _ in range(100):
            if server.errors:
                break
            await asyncio.sleep(0.01)
    assert server.peers == []
    assert any("is a CA" in e for e in server.errors), server.errors


async def test_rotation_keeps_open_connections_and_new_ones_get_the_new_certificate(
    identities: Callable[..., WorkloadIdentity],
) -> None:
    clock = FakeClock()
    cart = identities(CART, "cart-token", clock=clock, rand=lambda: 0.5)
    frontend = identities(FRONTEND, "frontend-token")
    await cart.start()
    await frontend.start()
    await asyncio.wait_for(asyncio.gather(cart.wait_ready(), frontend.wait_ready()), 10)
    first = cart.svid
    assert first is not None
    # The renewal loop sleeps until half the lifetime minus half the jitter (rand=0.5).
    delay = await clock.next_sleep()
    received = clock.now()  # the fake clock stands still: the certificate arrived "now"
    expected = (renewal_time(first.not_before, first.not_after, 0.5, received) - received).total_seconds()
    assert abs(delay - expected) < 2
    assert 0.4 * 3600 - 2 < delay < 0.5 * 3600  # 40-50% of the lifetime, not counting the backdated minute

    async with EchoServer(cart.server_context) as server:
        old_reader, old_writer = await connect(server.port, frontend.client_context())
        assert await roundtrip(old_reader, old_writer, b"before") == b"before"
        clock.wake()  # time to renew
        await clock.next_sleep()
        second = cart.svid
        assert second is not None and second.serial_hex != first.serial_hex and cart.rotations == 2
        assert second.key != first.key  # a new key for every certificate
        # The open connection still works, on the old certificate.
        assert await roundtrip(old_reader, old_writer, b"after" * 1000) == b"after" * 1000
        old_serial = old_writer.get_extra_info("ssl_object").getpeercert()["serialNumber"]
        assert int(old_serial, 16) == first.leaf.serial_number
        # A new connection sees the new certificate.
        new_reader, new_writer = await connect(server.port, frontend.client_context())
        assert await roundtrip(new_reader, new_writer, b"new") == b"new"
        new_serial = new_writer.get_extra_info("ssl_object").getpeercert()["serialNumber"]
        assert int(new_serial, 16) == second.leaf.serial_number
        old_writer.close()
        new_writer.close()


async def test_ca_outage_backs_off_keeps_serving_and_recovers(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    clock = FakeClock()
    client = ca.client()
    wi = WorkloadIdentity(CART, client, lambda: "cart-token", clock=clock, rand=lambda: 1.0)
    await wi.start()
    try:
        await asyncio.wait_for(wi.wait_ready(), 10)
        await clock.next_sleep()
        served = wi.server_context()
        port = ca.server.port
        await ca.server.stop(grace=0)  # the CA goes away
        delays = []
        for _ in range(4):
            clock.wake()
            delays.append(await clock.next_sleep())
        assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential backoff
        assert wi.state == "valid" and wi.server_context() is served and wi.last_error
        # The CA comes back on the same address: the next attempt succeeds.
        back = await start_ca(listen=f"127.0.0.1:{port}")
        assert back.server.port == port
        for _ in range(30):  # the channel reconnects within its (capped, 1 s) reconnect backoff
            clock.wake()
            await clock.next_sleep()
            if wi.last_error is None:
                break
            await asyncio.sleep(0.1)
        assert wi.last_error is None and wi.rotations == 2 and wi.server_context() is not served
    finally:
        await wi.stop()
        await client.close()


async def test_expiry_is_reported_when_the_ca_never_comes_back(start_ca: StartCA) -> None:
    ca = await start_ca()
    clock = FakeClock()
    client = ca.client()
    wi = WorkloadIdentity(CART, client, lambda: "cart-token", clock=clock, rand=lambda: 1.0)
    await wi.start()
    try:
        await asyncio.wait_for(wi.wait_ready(), 10)
        await clock.next_sleep()
        await ca.server.stop(grace=0)
        clock.wake(advance=2 * 3600)  # two hours later, still no CA
        await clock.next_sleep()
        assert wi.state == "expired" and not wi.ready
    finally:
        await wi.stop()
        await client.close()


def _cart_on_a_bundle_file(ca: RunningCA, tmp_path: Path) -> tuple[Path, CAClient, WorkloadIdentity]:
    """cart's identity (not started) with the CA's bundle in a file it watches, and its CA client."""
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(ca.bundle)
    client = ca.client()
    return (
        bundle_file,
        client,
        WorkloadIdentity(CART, client, lambda: "cart-token", bundle_file=bundle_file, clock=FakeClock()),
    )


async def test_trust_bundle_change_is_picked_up_without_restart(ca: RunningCA, tmp_path: Path) -> None:
    bundle_file, client, wi = _cart_on_a_bundle_file(ca, tmp_path)
    await wi.start()
    try:
        await asyncio.wait_for(wi.wait_ready(), 10)
        other = pki.make_authority(tmp_path / "next-root")
        other_client = pki.make_svid(other, FRONTEND).with_bundle(pki.lite(other.roots + ca.authority.roots))
        # Before: a client from the new root is refused.
        await _refused(wi.server_context(), tls.client_context(other_client))
        # The operator adds the new root to the bundle (root rotation with overlap).
        bundle_file.write_bytes(ca.bundle + keys.cert_pem(*other.roots))
        assert wi.reload_bundle()
        assert wi.svid is not None and len(wi.svid.bundle) == 2
        async with EchoServer(wi.server_context) as server:
            reader, writer = await connect(server.port, tls.client_context(other_client))
            assert await roundtrip(reader, writer, b"ok") == b"ok"
            writer.close()
        assert server.peers == [FRONTEND]
        # A broken bundle file is ignored; the current bundle stays.
        bundle_file.write_text("garbage")
        assert not wi.reload_bundle() and len(wi.svid.bundle) == 2
        # ... for renewals too: they read the file again and threw the CA's certificate away, so
        # the SVID expired with the CA answering (the log said the current bundle was kept).
        before = wi.svid.serial_hex
        renewed = await wi.renew()
        assert renewed.serial_hex != before and len(renewed.bundle) == 2
        bundle_file.unlink()  # (gone: the same)
        assert len((await wi.renew()).bundle) == 2
    finally:
        await wi.stop()
        await client.close()


def test_a_ca_answer_for_another_identity_or_key_is_rejected(ca: RunningCA) -> None:
    from sidemesh.identity.svid import PrivateKey, SvidError, new_key

    cart = pki.make_svid(ca.authority, CART)
    chain = [
        c.decode() + "-----END CERTIFICATE-----\n"
        for c in cart.chain_pem.split(b"-----END CERTIFICATE-----\n")[:-1]
    ]
    bundle = [cart.bundle_pem.decode()]
    assert SVID.from_pem(cart.key, chain, bundle, CART).leaf == cart.leaf
    with pytest.raises(SvidError, match="for another key"):
        SVID.from_pem(PrivateKey.of(new_key()), chain, bundle, CART)
    with pytest.raises(SvidError, match=r"expected spiffe://cluster\.local/ns/shop/sa/frontend"):
        SVID.from_pem(cart.key, chain, bundle, FRONTEND)
    with pytest.raises(SvidError, match="empty"):
        SVID.from_pem(cart.key, [], bundle, CART)
    with pytest.raises(SvidError, match="unparsable"):
        SVID.from_pem(
            cart.key, ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"], bundle, CART
        )


async def test_root_rotation_without_restarts(start_ca: StartCA, tmp_path: Path) -> None:
    """Both roots in the bundle, then the CA switches to an intermediate under the new root: a
    running workload keeps renewing (its channel to the CA trusts the new bundle)."""
    import shutil

    ca = await start_ca()
    bundle_file, client, wi = _cart_on_a_bundle_file(ca, tmp_path)
    await wi.start()
    try:
        await asyncio.wait_for(wi.wait_ready(), 10)
        new = tmp_path / "new-root"
        pki.make_authority(new)
        both = ca.bundle + (new / keys.ROOTS).read_bytes()
        # 1. Workloads learn to trust both roots.
        bundle_file.write_bytes(both)
        assert wi.reload_bundle()
        # 2. The CA switches to an intermediate under the new root (and keeps both in its bundle).
        for name in (keys.CA_CERT, keys.CA_KEY, keys.CHAIN):
            shutil.copy(new / name, ca.dir / name)
        (ca.dir / keys.ROOTS).write_bytes(both)
        assert ca.server.reload_if_changed()
        # ... and is restarted (so clients must handshake with its new serving certificate).
        port = ca.server.port
        await ca.server.stop(grace=0)
        await start_ca(listen=f"127.0.0.1:{port}", bootstrap=False)
        # 3. The next renewal works, and the new certificate chains to the new root.
        for _ in range(30):  # the channel reconnects within its 1 s reconnect backoff
            try:
                svid = await wi.renew()
                break
            except CAClientError:
                await asyncio.sleep(0.1)
        pki.crypto(svid.chain[1]).verify_directly_issued_by(keys.load(new).roots[0])
        assert len(svid.bundle) == 2
    finally:
        await wi.stop()
        await client.close()


async def test_a_failing_renewal_says_what_to_check(
    start_ca: StartCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing token file, or another workload's token, were retried for ever with nothing but
    the bare error in the log; the log line now says what to check."""
    ca = await start_ca()
    missing = tmp_path / "no-token"
    for token, hint, dns in (
        (token_from_file(missing), f"{missing} is missing: in a pod the injector mounts", ()),
        (lambda: "frontend-token", "the CA refused", ()),
        # A controller run as an identity the CA signs no DNS name for: it said to check the token.
        (lambda: "cart-token", "run as an identity the CA's --control-plane-dns lists", ("cart.shop.svc",)),
    ):
        caplog.clear()
        clock = FakeClock()
        client = ca.client()
        wi = WorkloadIdentity(CART, client, token, clock=clock, rand=lambda: 1.0, dns_names=dns)
        with caplog.at_level(logging.WARNING, logger="sidemesh.identity"):
            await wi.start()
            try:
                await clock.next_sleep()
            finally:
                await wi.stop()
                await client.close()
        (line,) = [r for r in caplog.records if r.getMessage() == "SVID renewal failed; retrying"]
        assert hint in line.hint, line.hint  # type: ignore[attr-defined]


def test_a_sidecar_server_resumes_no_session(tmp_path: Path) -> None:
    """A resumed TLS session keeps the client certificate of its first handshake, which OpenSSL
    does not check again: with tickets a client could go on as an identity whose certificate had
    expired (or whose bundle entry was removed without a restart). The server issues none."""
    authority = pki.make_authority(tmp_path)
    server_ctx = tls.server_context(pki.make_svid(authority, CART))
    client_ctx = tls.client_context(pki.make_svid(authority, FRONTEND))
    reused: list[bool] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    reused.append(s.session_reused)
                    s.sendall(b"x")

        server = threading.Thread(target=serve)
        server.start()
        port = listener.getsockname()[1]
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as first:
            first.recv(1)  # TLS 1.3 tickets come after the handshake
            session = first.session
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), session=session) as second:
            second.recv(1)
            assert not second.session_reused
        server.join(5)
    assert reused == [False, False]
    assert session is None or not session.has_ticket


async def test_a_root_of_another_trust_domain_in_the_bundle_file_cannot_vouch_for_ours(
    ca: RunningCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign SPIFFE root added to the PEM bundle let its CA mint identities of *our* trust
    domain: OpenSSL takes any root in the store for any ID. The SPIFFE specs validate an SVID
    against its own trust domain's bundle only; the mesh does not federate, so roots naming other
    trust domains are left out, with a warning (a root naming none, as an operator's own CA, is
    taken as ours)."""
    foreign = pki.make_authority(tmp_path / "foreign", trust_domain="partner.example")
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(
        ca.bundle + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in foreign.roots)
    )
    # The components build their CA client from the file as it is: the first Sign (it carries the
    # token) went over a channel that trusted the foreign root, which could vouch for the CA's name.
    client = CAClient(ca.address, bundle_file.read_bytes())
    clock = FakeClock()
    wi = WorkloadIdentity(CART, client, lambda: "cart-token", bundle_file=bundle_file, clock=clock)
    with caplog.at_level(logging.WARNING, logger="sidemesh.identity"):
        try:
            await wi.start()
            assert x509.load_pem_x509_certificates(client._bundle) == x509.load_pem_x509_certificates(
                ca.bundle
            )
            await asyncio.wait_for(wi.wait_ready(), 10)
            assert wi.svid is not None
            svid = wi.svid
        finally:
            await wi.stop()
            await client.close()
    assert [c.subject for c in svid.bundle] == [
        c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(ca.bundle)
    ]
    (line, *_) = [r for r in caplog.records if "other trust domains left out" in r.getMessage()]
    assert line.left_out == [foreign.roots[0].subject.rfc4514_string()]  # type: ignore[attr-defined]

    # partner.example's CA signs our trust domain's frontend: refused at the handshake.
    forged = pki.make_svid(foreign, FRONTEND).with_bundle(load_bundle(ca.bundle))
    seen: list[SpiffeId | str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with wi.server_context().wrap_socket(conn, server_side=True) as s:
                    seen.append(tls.peer_spiffe_id(s, "cluster.local"))
            except (ssl.SSLError, OSError) as exc:
                seen.append(str(exc))

        thread = threading.Thread(target=serve)
        thread.start()
        with (
            contextlib.suppress(ssl.SSLError, OSError),
            tls.client_context(forged).wrap_socket(socket.create_connection(listener.getsockname())) as s,
        ):
            s.recv(1)
        thread.join(10)
    assert len(seen) == 1 and "certificate verify failed" in str(seen[0]), seen

    # A bundle file of other trust domains only is no bundle for this one.
    bundle_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in foreign.roots))
    with pytest.raises(SvidError, match=r"no root for trust domain 'cluster\.local'.*partner\.example"):
        wi._file_bundle()


@pytest.mark.parametrize(
    ("extension", "names"),
    [
        # cryptography 51 refuses to read an empty certificatePolicies (OpenSSL takes it); a root
        # carrying one was read as naming no trust domain, so kept as ours. Not read here.
        ((ExtensionOID.CERTIFICATE_POLICIES, b"\x30\x00"), {"partner.example"}),
        ((ExtensionOID.ISSUER_ALTERNATIVE_NAME, b"\x30\x00"), {"partner.example"}),
        # A subjectAltName that cannot be read: empty, a URI that is not ASCII, not DER.
        ((ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x00"), {UNREADABLE}),
        ((ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x86\x01\xff"), {UNREADABLE}),
        ((ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x05\x86\x01a"), {UNREADABLE}),
        # A URI in BER's constructed form: OpenSSL reads spiffe://partner.example there.
        (
            (ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x1c\xa6\x1a\x16\x18spiffe://partner.example"),
            {UNREADABLE},
        ),
        # basicConstraints that cannot be read.
        ((ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x01\x01\x01"), {UNREADABLE}),
    ],
)
def test_a_foreign_root_whose_extensions_cannot_be_read_is_not_taken_for_ours(
    tmp_path: Path, extension: tuple[x509.ObjectIdentifier, bytes], names: set[str]
) -> None:
    """A root is ours when it names our trust domain or none. One whose extensions cannot be read
    names none we can see: it must never be taken as ours (its CA could mint our IDs)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ours = pki.make_authority(tmp_path / "ours")
    oid, value = extension
    key = templates.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "partner root")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    )
    if oid != ExtensionOID.BASIC_CONSTRAINTS:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://partner.example")]),
            critical=False,
        )
    (root,) = pki.lite([builder.sign(key, hashes.SHA256())])
    assert root_trust_domains(root) == names
    bundle = (*pki.lite(ours.roots), root)
    assert foreign_roots(bundle, "cluster.local") == [root]
    assert own_roots(bundle, "cluster.local") == pki.lite(ours.roots)
    with pytest.raises(SvidError, match="no root for trust domain"):
        own_roots((root,), "cluster.local")


async def test_the_renewal_loop_survives_what_it_did_not_expect(
    start_ca: StartCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A token file in another encoding (UnicodeDecodeError) or one grpc refuses as metadata (a
    byte-order mark: ExecuteBatchError) ended the renewal task for good, silently: the workload
    stayed pending after the file was fixed, and stop() raised the error. Now it is told, and the
    loop goes on (a fixed file is taken at the next attempt)."""
    ca = await start_ca()
    token_file = tmp_path / "token"
    client = ca.client()
    clock = FakeClock()
    wi = WorkloadIdentity(CART, client, token_from_file(token_file), clock=clock, rand=lambda: 1.0)
    try:
        for bad in ("cart-token".encode("utf-16"), "\ufeffcart-token".encode(), b"cart-token\nsecond line"):
            token_file.write_bytes(bad)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="sidemesh.identity"):
                if not wi._tasks:
                    await wi.start()
                else:
                    clock.wake()
                await clock.next_sleep()
            (line,) = [r for r in caplog.records if r.getMessage() == "SVID renewal failed; retrying"]
            assert "does not hold a token" in line.error and "write only the token" in line.hint  # type: ignore[attr-defined]
            assert wi.state == "pending" and not any(t.done() for t in wi._tasks)
        token_file.write_text("cart-token\n")
        clock.wake()
        await asyncio.wait_for(wi.wait_ready(), 10)
        assert wi.state == "valid"
    finally:
        await wi.stop()  # raised the loop's exception before
        await client.close()


async def test_an_unexpected_error_is_logged_with_its_traceback_and_retried(
    ca: RunningCA, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def token() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("surprise")
        return "cart-token"

    client = ca.client()
    clock = FakeClock()
    wi = WorkloadIdentity(CART, client, token, clock=clock, rand=lambda: 1.0)
    with caplog.at_level(logging.WARNING, logger="sidemesh.identity"):
        await wi.start()
        try:
            await clock.next_sleep()
            clock.wake()
            await asyncio.wait_for(wi.wait_ready(), 10)
        finally:
            await wi.stop()
            await client.close()
    (line,) = [r for r in caplog.records if r.getMessage() == "SVID renewal failed; retrying"]
    assert line.levelno == logging.ERROR and line.exc_info is not None and "surprise" in line.error  # type: ignore[attr-defined]


async def test_a_clock_ahead_of_the_cas_by_a_lifetime_backs_off(
    ca: RunningCA, caplog: pytest.LogCaptureFixture
) -> None:
    """Certificates that arrive expired (this clock ahead of the CA's by their lifetime) were
    renewed at once, again and again without a pause (200 CSRs in 3 s); now each is a failure
    that names the skew, with backoff."""
    clock = FakeClock()
    clock.offset = dt.timedelta(hours=2)  # the default lifetime is 1 h
    client = ca.client()
    wi = WorkloadIdentity(CART, client, lambda: "cart-token", clock=clock, rand=lambda: 1.0)
    delays = []
    with caplog.at_level(logging.WARNING, logger="sidemesh.identity"):
        await wi.start()
        try:
            for _ in range(4):
                delays.append(await clock.next_sleep())
                clock.wake()
        finally:
            await wi.stop()
            await client.close()
    assert delays == [1.0, 2.0, 4.0, 8.0], delays
    assert wi.rotations == 0 and wi.svid is None
    line = next(r for r in caplog.records if r.getMessage() == "SVID renewal failed; retrying")
    assert "clock ahead of the CA's" in line.error  # type: ignore[attr-defined]


async def test_a_refusal_before_the_first_certificate_backs_off_further_than_an_outage(
    start_ca: StartCA,
) -> None:
    """Before the first certificate the workload asks again within 2 s when that can help (the CA
    unreachable or busy); a refusal (another workload's token) needs a change first, and was
    asked again every 2 s for ever, a warning and a CA refusal each time: backoff up to 60 s."""
    ca = await start_ca()
    delays: dict[str, list[float]] = {}
    for name, token in (("refused", "frontend-token"), ("unreachable", "cart-token")):
        client = ca.client() if name == "refused" else CAClient("127.0.0.1:1", ca.bundle, timeout=0.5)
        clock = FakeClock()
        wi = WorkloadIdentity(CART, client, lambda token=token: token, clock=clock, rand=lambda: 1.0)
        await wi.start()
        try:
            got = delays[name] = []
            for _ in range(7):
                got.append(await clock.next_sleep())
                clock.wake()
        finally:
            await wi.stop()
            await client.close()
    assert delays["refused"] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert delays["unreachable"] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_a_missing_bundle_file_is_named_as_such_not_as_the_token() -> None:
    from sidemesh.identity.workload import renewal_hint

    missing = FileNotFoundError(2, "No such file or directory", "/var/run/sidemesh/bundle/root-cert.pem")
    hint = renewal_hint(missing, Path("/var/run/sidemesh/bundle/root-cert.pem"))
    assert "--bundle-file" in hint and "token" not in hint
    token = FileNotFoundError(2, "No such file or directory", "/var/run/secrets/tokens/sidemesh-ca/token")
    assert "token" in renewal_hint(token, Path("/var/run/sidemesh/bundle/root-cert.pem"))


async def test_a_bundle_file_with_only_another_trust_domains_roots_trusts_nothing(
    ca: RunningCA, tmp_path: Path
) -> None:
    """The client kept the file as read when none of its roots was ours: the first Sign, token and
    all, went over a channel that trusted the foreign roots (review of session 16, reproduced with
    a real CA of the other trust domain)."""
    foreign = pki.make_authority(tmp_path / "foreign", trust_domain="partner.example")
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in foreign.roots))
    client = CAClient(ca.address, bundle_file.read_bytes())
    wi = WorkloadIdentity(CART, client, lambda: "cart-token", bundle_file=bundle_file, clock=FakeClock())
    try:
        await wi.start()
        assert client._bundle == b""
        with pytest.raises(CAClientError, match="no certificate"):
            await client.sign("cart-token", "unused")
    finally:
        await wi.stop()
        await client.close()


class _Yielding(FakeClock):
    """A clock whose sleep passes at once (as if every backoff had elapsed)."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


async def test_the_renewal_loop_outlives_a_thousand_failed_attempts(start_ca: StartCA) -> None:
    """A CA unreachable for about an hour (1,025 attempts, 2 s apart without a certificate): the
    backoff's 2.0 ** attempt overflowed inside the failure handler, the renewal task ended, and the
    workload stayed without a certificate when the CA came back (until restarted)."""
    ca = await start_ca()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there
    clock = _Yielding()
    client = CAClient(f"127.0.0.1:{closed}", ca.bundle, timeout=1.0)
    wi = WorkloadIdentity(CART, client, lambda: "cart-token", clock=clock, rand=lambda: 1.0)
    await wi.start()
    try:
        for _ in range(600):
            if len(clock.sleeps) > 1100 or wi._tasks[0].done():
                break
            await asyncio.sleep(0.05)
        assert not wi._tasks[0].done(), wi._tasks[0].exception()
        assert len(clock.sleeps) > 1100 and wi.state == "pending" and wi.last_error
    finally:
        await wi.stop()
        await client.close()


def _held_signs(client: CAClient) -> asyncio.Event:
    """The client's Sign calls wait until the event is set (a CA slow to answer)."""
    answer = asyncio.Event()
    sign = client.sign

    async def slow_sign(*args: object, **kwargs: object) -> object:
        await answer.wait()
        return await sign(*args, **kwargs)  # type: ignore[arg-type]

    client.sign = slow_sign  # type: ignore[method-assign]
    return answer


async def test_a_bundle_change_while_a_renewal_waits_for_the_ca_stands(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """A renewal reads the bundle file before it asks the CA. A new bundle the watch installed
    meanwhile (a root rotation's step: both roots published) was undone by that renewal's
    certificate, and the file, its change already seen, was not read again until the next one."""
    ca = await start_ca()
    bundle_file, client, wi = _cart_on_a_bundle_file(ca, tmp_path)
    await wi.start()
    try:
        await asyncio.wait_for(wi.wait_ready(), 10)
        wi.reload_bundle()
        assert wi.svid is not None and len(wi.svid.bundle) == 1
        answer = _held_signs(client)
        renewal = asyncio.create_task(wi.renew())
        await asyncio.sleep(0.05)
        pki.make_authority(tmp_path / "new-root")
        bundle_file.write_bytes(ca.bundle + (tmp_path / "new-root" / keys.ROOTS).read_bytes())
        assert wi.reload_bundle() and len(wi.svid.bundle) == 2
        answer.set()
        await renewal
        assert len(wi.svid.bundle) == 2
        assert len(wi.server_context().get_ca_certs()) == 2
    finally:
        await wi.stop()
        await client.close()


async def test_a_bundle_change_during_the_first_sign_is_kept(start_ca: StartCA, tmp_path: Path) -> None:
    """Before the first certificate a change the watch sees has nothing to go into, and the file is
    not looked at again: the first certificate went in with the bundle read before the CA call."""
    ca = await start_ca()
    bundle_file, client, wi = _cart_on_a_bundle_file(ca, tmp_path)
    answer = _held_signs(client)
    await wi.start()
    try:
        await asyncio.sleep(0.05)  # the first renewal read the file (one root) and waits for the CA
        pki.make_authority(tmp_path / "new-root")
        bundle_file.write_bytes(ca.bundle + (tmp_path / "new-root" / keys.ROOTS).read_bytes())
        assert not wi.reload_bundle()  # the watch's poll: nothing to install into yet
        answer.set()
        await asyncio.wait_for(wi.wait_ready(), 10)
        assert wi.svid is not None and len(wi.svid.bundle) == 2
        assert len(wi.server_context().get_ca_certs()) == 2
    finally:
        await wi.stop()
        await client.close()
