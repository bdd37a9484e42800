"""The CA through its real interface: gRPC over TLS (grpcio serving, our grpclib client), certificates checked independently."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.parser import text_string_to_metric_families
from spiffe.svid.x509_svid import X509Svid

from ca import keys
from ca.authn import LocalTokenAuthenticator
from sidemesh.api import ca_pb2
from sidemesh.grpc_client import Status
from sidemesh.identity.client import CAClient, CAClientError
from sidemesh.identity.svid import make_csr, new_key
from sidemesh.spiffe import SpiffeId, WorkloadId
from tests.integration.conftest import RunningCA, StartCA
from tests.support import pki
from tests.support.clock import FakeClock
from tests.support.tcp_relay import TcpRelay

FRONTEND = WorkloadId("shop", "frontend")
FRONTEND_ID = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")


def http_get(ca: RunningCA, path: str, timeout: float = 5) -> tuple[int, bytes]:
    """Blocking: call it on a thread (the CA's pages are served by the test's event loop)."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{ca.server.metrics_port}{path}", timeout=timeout
        ) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def metric(ca: RunningCA, name: str, labels: dict[str, str] | None = None) -> float:
    status, raw = await asyncio.to_thread(http_get, ca, "/metrics")
    assert status == 200
    body = raw.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and (
                labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
            ):
                return float(sample.value)
    return 0.0


async def sign_raw(ca: RunningCA, csr: str, token: str | None = "frontend-token", ttl: int = 0) -> None:
    client = ca.client()
    try:
        if token is None:  # no metadata at all
            await client.call(ca_pb2.SignRequest(csr=csr), {})
        else:
            await client.sign(token, csr, ttl)
    finally:
        await client.close()


def own_csr() -> str:
    return make_csr(new_key(), FRONTEND_ID)


async def test_issues_an_x509_svid_that_independent_parsers_accept(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    svid = await ca.issue("frontend-token", FRONTEND)
    leaf = pki.crypto(svid.leaf)

    # The spiffe package (an independent SPIFFE implementation) parses it as an X.509-SVID.
    parsed = X509Svid.parse(svid.chain_pem, svid.key_pem)
    assert str(parsed.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/frontend"

    # openssl verifies the chain against the bundle, for both TLS purposes.
    (tmp_path / "leaf.pem").write_bytes(
        svid.chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    )
    (tmp_path / "chain.pem").write_bytes(svid.chain_pem)
    (tmp_path / "bundle.pem").write_bytes(svid.bundle_pem)
    for purpose in ("sslclient", "sslserver"):
        out = subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                tmp_path / "bundle.pem",
                "-untrusted",
                tmp_path / "chain.pem",
                tmp_path / "leaf.pem",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr

    # The profile: one URI SAN, nothing else; CA:false; digitalSignature; server+client auth; P-256.
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and [type(n) for n in san.value] == [x509.UniformResourceIdentifier]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert (
        isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        and leaf.public_key().curve.name == "secp256r1"
    )
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(0) <= now - leaf.not_valid_before_utc <= dt.timedelta(seconds=65)
    assert abs((leaf.not_valid_after_utc - now) - dt.timedelta(hours=1)) < dt.timedelta(seconds=10)
    assert len(svid.chain) == 2 and len(svid.bundle) == 1


async def test_ca_copies_nothing_from_the_csr_but_its_key(start_ca: StartCA) -> None:
    ca = await start_ca()
    key = new_key()
    # A CSR with a subject and an extra extension the CA must ignore.
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin"),
                    x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "system:masters"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(FRONTEND_ID))]), critical=False
        )
        .add_extension(x509.OCSPNoCheck(), critical=False)
    )
    from cryptography.hazmat.primitives import hashes, serialization

    csr = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    client = ca.client()
    resp = await client.sign("frontend-token", csr)
    await client.close()
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    assert leaf.subject == x509.Name([])
    assert {e.oid for e in leaf.extensions} == {
        x509.oid.ExtensionOID.BASIC_CONSTRAINTS,
        x509.oid.ExtensionOID.KEY_USAGE,
        x509.oid.ExtensionOID.EXTENDED_KEY_USAGE,
        x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    assert resp.spiffe_id == str(FRONTEND_ID) and resp.serial == format(leaf.serial_number, "x")


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (0, dt.timedelta(hours=1)),
        (60, dt.timedelta(minutes=5)),
        (7200, dt.timedelta(hours=2)),
        (100 * 3600, dt.timedelta(hours=24)),
    ],
)
async def test_ttl_is_clamped(start_ca: StartCA, ttl: int, expected: dt.timedelta) -> None:
    ca = await start_ca()
    svid = await ca.issue("frontend-token", FRONTEND, ttl=ttl)
    lifetime = svid.not_after - dt.datetime.now(dt.UTC)
    assert abs(lifetime - expected) < dt.timedelta(seconds=10)


async def test_not_after_never_passes_the_issuing_certificate(start_ca: StartCA) -> None:
    ca = await start_ca(intermediate_lifetime=dt.timedelta(minutes=30))
    svid = await ca.issue("frontend-token", FRONTEND, ttl=24 * 3600)
    assert svid.not_after == ca.authority.cert.not_valid_after_utc


def _uri(text: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(text)


BAD_CSRS = {
    "garbage": (lambda: "this is not a CSR", Status.INVALID_ARGUMENT, "not a PEM-encoded PKCS#10"),
    "garbage-pem": (
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        Status.INVALID_ARGUMENT,
        "not a PEM-encoded",
    ),
    "empty": (lambda: "", Status.INVALID_ARGUMENT, "csr is empty"),
    "signed-by-another-key": (
        lambda: pki.csr_signed_by_other_key(FRONTEND_ID),
        Status.INVALID_ARGUMENT,
        "proof of possession",
    ),
    "two-uri-sans": (
        lambda: pki.csr_pem(
            new_key(), [_uri(str(FRONTEND_ID)), _uri("spiffe://cluster.local/ns/shop/sa/cart")]
        ),
        Status.INVALID_ARGUMENT,
        "exactly one URI SAN, found 2",
    ),
    "dns-san": (
        lambda: pki.csr_pem(new_key(), [_uri(str(FRONTEND_ID)), x509.DNSName("cart.shop.svc")]),
        Status.INVALID_ARGUMENT,
        "only a URI SAN, found DNSName",
    ),
    "no-san": (lambda: pki.csr_pem(new_key(), []), Status.INVALID_ARGUMENT, "no subjectAltName"),
    "ca-true": (
        lambda: pki.csr_pem(new_key(), [_uri(str(FRONTEND_ID))], ca=True),
        Status.INVALID_ARGUMENT,
        "CA:true",
    ),
    "rsa-key": (
        lambda: pki.csr_pem(rsa.generate_private_key(65537, 2048), [_uri(str(FRONTEND_ID))]),
        Status.INVALID_ARGUMENT,
        "must be ECDSA P-256",
    ),
    "p384-key": (
        lambda: pki.csr_pem(ec.generate_private_key(ec.SECP384R1()), [_uri(str(FRONTEND_ID))]),
        Status.INVALID_ARGUMENT,
        "got EC secp384r1",
    ),
    "not-spiffe": (
        lambda: pki.csr_pem(new_key(), [_uri("https://cart.shop")]),
        Status.INVALID_ARGUMENT,
        "not a SPIFFE ID",
    ),
    "other-identity": (
        lambda: make_csr(new_key(), SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")),
        Status.PERMISSION_DENIED,
        "may only request its own identity",
    ),
    "other-trust-domain": (
        lambda: make_csr(new_key(), SpiffeId.parse("spiffe://evil.example/ns/shop/sa/frontend")),
        Status.PERMISSION_DENIED,
        "but the token authenticates spiffe://cluster.local/ns/shop/sa/frontend",
    ),
    "large": (lambda: "A" * 30_000, Status.INVALID_ARGUMENT, "larger than 16384 bytes"),
    "over-grpc-limit": (lambda: "A" * 100_000, Status.RESOURCE_EXHAUSTED, "larger than max"),
}


async def test_bad_csrs_are_refused_clearly_and_nothing_is_issued(start_ca: StartCA) -> None:
    ca = await start_ca()
    for name, (make, code, message) in BAD_CSRS.items():
        with pytest.raises(CAClientError) as info:
            await sign_raw(ca, make())
        assert info.value.code == code, name
        assert message in info.value.message, (name, info.value.message)
    assert await metric(ca, "sidemesh_ca_certificates_issued_total") == 0
    # over-grpc-limit is refused by grpc before it reaches the service
    assert (
        await metric(ca, "sidemesh_ca_requests_refused_total", {"reason": "invalid_request"})
        == len(BAD_CSRS) - 3
    )
    assert await metric(ca, "sidemesh_ca_requests_refused_total", {"reason": "identity_mismatch"}) == 2
    # The server is unharmed: a good request still works.
    await ca.issue("frontend-token", FRONTEND)
    assert await metric(ca, "sidemesh_ca_certificates_issued_total") == 1


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "no bearer token"),
        ("", "Bearer <token>"),
        ("nope", "token not recognized"),
        ("expired-token", "token expired"),
    ],
)
async def test_bad_tokens_are_unauthenticated(start_ca: StartCA, token: str | None, message: str) -> None:
    ca = await start_ca()
    with pytest.raises(CAClientError) as info:
        await sign_raw(ca, own_csr(), token=token)
    assert info.value.code == Status.UNAUTHENTICATED
    assert message in info.value.message
    assert await metric(ca, "sidemesh_ca_requests_refused_total", {"reason": "unauthenticated"}) == 1


@pytest.mark.parametrize("ttl", [-1, 10**9])
async def test_ttl_out_of_range_is_refused(start_ca: StartCA, ttl: int) -> None:
    ca = await start_ca()
    with pytest.raises(CAClientError) as info:
        await sign_raw(ca, own_csr(), ttl=ttl)
    assert info.value.code == Status.INVALID_ARGUMENT and "ttl_seconds" in info.value.message


async def test_rate_limit_per_identity(start_ca: StartCA) -> None:
    ca = await start_ca(rate_limit=0.001, rate_burst=2)
    await ca.issue("frontend-token", FRONTEND)
    await ca.issue("frontend-token", FRONTEND)
    with pytest.raises(CAClientError) as info:
        await ca.issue("frontend-token", FRONTEND)
    assert info.value.code == Status.RESOURCE_EXHAUSTED and info.value.retryable
    # Another identity has its own bucket.
    await ca.issue("cart-token", WorkloadId("shop", "cart"))


async def test_audit_log_line_per_issuance_without_secrets(
    start_ca: StartCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ca = await start_ca()
    svid = await ca.issue("frontend-token", FRONTEND)
    with pytest.raises(CAClientError):
        await sign_raw(ca, own_csr(), token="nope")
    audits = [r for r in caplog.records if r.name == "sidemesh.ca.audit"]
    assert len(audits) == 1
    record = audits[0].__dict__
    assert record["identity"] == str(FRONTEND_ID)
    assert record["serial"] == svid.serial_hex
    assert record["not_after"] == svid.not_after.isoformat()
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "frontend-token" not in everything and "nope" not in everything and "PRIVATE KEY" not in everything
    assert "token not recognized" in everything  # the refusal is logged, without the token


async def test_probes_come_from_the_serving_loop_and_readiness_follows_the_signing_certificate(
    start_ca: StartCA,
) -> None:
    clock = FakeClock()
    ca = await start_ca(clock=clock)
    status, body = await asyncio.to_thread(http_get, ca, "/healthz/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    assert (await asyncio.to_thread(http_get, ca, "/healthz/live"))[0] == 200

    # The event loop that serves the gRPC calls stops running: the liveness probe gets no answer
    # (a probe answered by a thread of its own, or a tcpSocket probe, would still pass).
    def late_probe() -> tuple[int, bytes]:
        time.sleep(0.1)  # asks once the loop is blocked
        return http_get(ca, "/healthz/live", 0.5)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        probe = pool.submit(late_probe)
        time.sleep(1.0)  # noqa: ASYNC251 - the point: the loop is blocked here
        with pytest.raises(TimeoutError):
            probe.result()
    assert (await asyncio.to_thread(http_get, ca, "/healthz/live"))[0] == 200
    # The intermediate expires: not ready (every certificate it signed would be refused), still live.
    clock.offset = ca.authority.cert.not_valid_after_utc - dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    status, body = await asyncio.to_thread(http_get, ca, "/healthz/ready")
    assert status == 503
    page = json.loads(body)
    assert page["ready"] is False and "expired" in page["reasons"][0] and "--ca-dir" in page["reasons"][0]
    assert (await asyncio.to_thread(http_get, ca, "/healthz/live"))[0] == 200
    await ca.server.stop(grace=0)
    with pytest.raises(urllib.error.URLError, match="refused"):  # the pages stop with the CA
        await asyncio.to_thread(http_get, ca, "/healthz/live", 1)


async def test_restart_keeps_the_same_root(start_ca: StartCA) -> None:
    first = await start_ca()
    before = await first.issue("frontend-token", FRONTEND)
    await first.server.stop(grace=0)
    second = await start_ca()  # same directory: loads, does not bootstrap again
    after = await second.issue("frontend-token", FRONTEND)
    assert before.bundle == after.bundle
    assert after.serial_hex != before.serial_hex
    pki.crypto(after.leaf).verify_directly_issued_by(pki.crypto(before.chain[1]))


async def test_client_with_a_foreign_bundle_cannot_talk_to_the_ca(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    foreign = pki.make_authority(tmp_path / "foreign")
    client = CAClient(ca.address, b"".join(keys.cert_pem(r) for r in foreign.roots), timeout=3)
    try:
        with pytest.raises(CAClientError) as info:
            await client.sign("frontend-token", own_csr())
        assert info.value.code == Status.UNAVAILABLE
    finally:
        await client.close()
    assert await metric(ca, "sidemesh_ca_certificates_issued_total") == 0


async def test_plug_in_intermediate_and_multi_root_bundle(start_ca: StartCA, tmp_path: Path) -> None:
    """An operator's own root signs our intermediate; the bundle also holds a second (new) root."""
    op_dir = tmp_path / "operator"
    operator = pki.make_authority(op_dir)  # operator's root + intermediate
    new_root = pki.make_authority(tmp_path / "next-root")
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for name in (keys.CA_CERT, keys.CA_KEY, keys.CHAIN):
        (ca_dir / name).write_bytes((op_dir / name).read_bytes())
    (ca_dir / keys.ROOTS).write_bytes(keys.cert_pem(*operator.roots, *new_root.roots))
    ca = await start_ca(bootstrap=False)
    svid = await ca.issue("frontend-token", FRONTEND)
    assert len(svid.bundle) == 2
    pki.crypto(svid.leaf).verify_directly_issued_by(operator.cert)


async def test_ca_reloads_a_new_intermediate_without_restart(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    old = ca.authority
    keys.bootstrap(ca.dir, "cluster.local", dt.datetime.now(dt.UTC), force=True)
    assert ca.server.reload_if_changed()
    # New roots: clients use the new bundle (the CA's serving certificate is renewed too).
    client = CAClient(ca.address, (ca.dir / keys.ROOTS).read_bytes(), timeout=5)
    resp = await client.sign("frontend-token", own_csr())
    await client.close()
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    new = keys.load(ca.dir)
    assert new.cert != old.cert
    leaf.verify_directly_issued_by(new.cert)
    # Broken material is refused and the CA keeps signing with what it had; an encrypted key as
    # well (its TypeError escaped and ended the CA's watch of its directory for good).
    good_key = (ca.dir / keys.CA_KEY).read_bytes()
    (ca.dir / keys.CA_KEY).write_text("garbage")
    assert not ca.server.reload_if_changed()
    encrypted = serialization.load_pem_private_key(good_key, None).private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    (ca.dir / keys.CA_KEY).write_bytes(encrypted)
    assert not ca.server.reload_if_changed()
    (ca.dir / keys.CA_KEY).write_bytes(good_key + b"\n")  # put right (another stamp)
    assert ca.server.reload_if_changed()
    client = CAClient(ca.address, (ca.dir / keys.ROOTS).read_bytes(), timeout=5)
    await client.sign("frontend-token", own_csr())
    await client.close()


async def test_material_not_valid_yet_is_taken_once_it_is(start_ca: StartCA) -> None:
    """An intermediate staged early replaced the working one at once, and nothing could be signed
    until it became valid; now the CA keeps signing with what it had and takes the new material
    once it is valid."""
    from tests.support.clock import FakeClock

    clock = FakeClock()
    ca = await start_ca(clock=clock)
    old = ca.authority
    # Four minutes ahead: within the skew signing allows, but the working material goes on until
    # then (taken early, the CA served itself a certificate its clients refuse as not valid yet).
    keys.bootstrap(ca.dir, "cluster.local", dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4), force=True)
    assert not ca.server.reload_if_changed()
    assert ca.server.service.authority.cert == old.cert
    client = CAClient(ca.address, keys.cert_pem(*old.roots), timeout=5)  # still signing, with the old
    resp = await client.sign("frontend-token", own_csr())
    await client.close()
    x509.load_pem_x509_certificate(resp.cert_chain[0].encode()).verify_directly_issued_by(old.cert)
    clock.offset = dt.timedelta(minutes=5)
    assert ca.server.reload_if_changed()  # looked at again, and valid now
    assert ca.server.service.authority.cert != old.cert


async def test_local_token_file_is_reloaded(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca()
    token_file = tmp_path / "tokens.yaml"
    token_file.write_text("tokens:\n- {token: new-token, namespace: shop, serviceAccount: frontend}\n")
    import os

    os.utime(token_file, ns=(1, 1))  # a different mtime than before, whatever the clock's resolution
    await asyncio.sleep(1.1)  # the file is checked at most once a second
    await ca.issue("new-token", FRONTEND)
    with pytest.raises(CAClientError):
        await ca.issue("frontend-token", FRONTEND)
    assert isinstance(ca.server.service.authenticator, LocalTokenAuthenticator)


async def test_dns_names_only_for_the_control_plane_identities_the_operator_allows(start_ca: StartCA) -> None:
    ca = await start_ca()
    controller = SpiffeId.parse("spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-controller")
    name = "sidemesh-controller.sidemesh-system.svc"
    client = ca.client()
    try:
        resp = await client.sign("controller-token", make_csr(new_key(), controller, (name,)))
        leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(controller)]
        # The controller may not ask for any other name ...
        with pytest.raises(CAClientError) as info:
            await client.sign("controller-token", make_csr(new_key(), controller, ("cart.shop.svc",)))
        assert info.value.code == Status.INVALID_ARGUMENT
        # ... and a workload may not ask for the controller's name.
        with pytest.raises(CAClientError) as info:
            await client.sign("frontend-token", make_csr(new_key(), FRONTEND_ID, (name,)))
        assert info.value.code == Status.INVALID_ARGUMENT and "only a URI SAN" in info.value.message
    finally:
        await client.close()


class _SlowFirst(LocalTokenAuthenticator):
    """The CA's first answer takes ``delay`` (an overloaded CA); the rest come at once."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay, self.calls = delay, 0

    async def authenticate(self, token: str, peer: str = "") -> WorkloadId:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(self.delay)
        return await super().authenticate(token, peer)


async def test_a_sign_that_times_out_leaves_the_caller_not_cancelling(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """grpclib ends a call at its deadline by cancelling the task it runs in: the caller's task
    stayed "being cancelled", and the renewal loop (which stops when its task is) stopped for good
    after one slow answer, without a word, until the certificate expired."""
    ca = await start_ca(authenticator=_SlowFirst(tmp_path / "tokens.yaml", delay=1.0))
    client = CAClient(ca.address, ca.bundle, timeout=0.3)
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(CAClientError) as slow:
        await client.sign("frontend-token", own_csr())
    assert slow.value.code is Status.DEADLINE_EXCEEDED and task.cancelling() == 0
    await client.sign("frontend-token", own_csr())  # and the next one goes through
    await client.close()


async def test_renewal_goes_on_after_a_sign_that_timed_out(start_ca: StartCA, tmp_path: Path) -> None:
    from sidemesh.identity.workload import WorkloadIdentity

    ca = await start_ca(authenticator=_SlowFirst(tmp_path / "tokens.yaml", delay=1.0))
    client = CAClient(ca.address, ca.bundle, timeout=0.3)
    identity = WorkloadIdentity(FRONTEND_ID, client, lambda: "frontend-token", rand=lambda: 0.0)
    await identity.start()
    try:
        await asyncio.wait_for(identity.wait_ready(), 10)  # (the first Sign timed out; retried)
        assert identity.state == "valid" and not identity._tasks[0].done()
    finally:
        await identity.stop()
        await client.close()


async def test_a_sign_in_flight_when_the_ca_stops_gracefully_is_answered(
    start_ca: StartCA, tmp_path: Path
) -> None:
    """A rolling restart: grpcio's stop(grace) sends GOAWAY and lets calls in flight finish, but
    h2 fails every call on the connection at the GOAWAY (python-hyper/h2#1181): it failed with
    UNAVAILABLE. The client asks once more on a new connection: the Service's next replica."""
    old = await start_ca(authenticator=_SlowFirst(tmp_path / "tokens.yaml", delay=1.0))
    new = await start_ca()
    service = TcpRelay(old.server.port)
    client = CAClient(await service.start(), old.bundle, timeout=10)
    call = asyncio.create_task(client.sign("frontend-token", own_csr()))
    await asyncio.sleep(0.3)
    service.target_port = new.server.port  # the old replica leaves the endpoints, then stops
    stopping = asyncio.create_task(old.server.stop(grace=5.0))
    try:
        reply = await asyncio.wait_for(call, 10)
        assert reply.cert_chain
    finally:
        await stopping
        await client.close()
        await service.close()


def test_an_empty_bundle_trusts_nothing() -> None:
    """ssl.create_default_context took empty data as none given: the system's roots were trusted."""
    import ssl

    from sidemesh import grpc_client

    with pytest.raises(ssl.SSLError, match="no certificate"):
        grpc_client.tls_context(b"")
