"""Leaves from the DER template against the reference builder, byte for byte and field by field."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe.svid.x509_svid import X509Svid

from ca import issuer, keys, leaf, templates
from ca.errors import SigningUnavailable
from sidemesh.spiffe import SpiffeId
from tests.support import pki

UTC = dt.UTC
CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
NOW = dt.datetime(2026, 11, 26, 15, 4, 5, 678_901, tzinfo=UTC)
# The authorities are valid from a day before NOW and for their lifetime past today as well: some
# tests sign at NOW (byte-for-byte comparisons), some at the real time (openssl, spiffe).
START = NOW - dt.timedelta(days=1)
SINCE = max(dt.timedelta(0), dt.datetime.now(UTC) - NOW)


def ec_authority(tmp: Path, lifetime: dt.timedelta = dt.timedelta(days=365)) -> keys.SigningAuthority:
    return keys.bootstrap(tmp, "cluster.local", START, intermediate_lifetime=lifetime + SINCE)


def rsa_authority() -> keys.SigningAuthority:
    """An operator's PKI (plug-in CA) whose intermediate has an RSA key."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", START, dt.timedelta(days=30) + SINCE)
    key = rsa.generate_private_key(65537, 2048)
    inter = templates.intermediate_certificate(
        cast(Any, key.public_key()),
        "cluster.local",
        root,
        root_key,
        START,
        dt.timedelta(days=7) + SINCE,
    )
    return keys.assemble(inter, key, [inter, root], [root])


def key_info(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def reference(
    authority: keys.SigningAuthority, params: templates.LeafParams, serial: int
) -> x509.Certificate:
    builder = templates.leaf_builder(params, authority.cert, authority.chain, serial)
    return builder.sign(authority.key, hashes.SHA256())


def assert_same_fields(ours: x509.Certificate, ref: x509.Certificate) -> None:
    assert ours.version == ref.version == x509.Version.v3
    assert ours.issuer == ref.issuer and ours.subject == ref.subject == x509.Name([])
    assert ours.not_valid_before_utc == ref.not_valid_before_utc
    assert ours.not_valid_after_utc == ref.not_valid_after_utc
    assert ours.public_key() == ref.public_key()
    assert ours.signature_algorithm_oid == ref.signature_algorithm_oid
    assert [(e.oid, e.critical, e.value) for e in ours.extensions] == [
        (e.oid, e.critical, e.value) for e in ref.extensions
    ]


@pytest.fixture(params=["ec", "rsa"])
def authority(request: pytest.FixtureRequest, tmp_path: Path) -> keys.SigningAuthority:
    return ec_authority(tmp_path) if request.param == "ec" else rsa_authority()


@pytest.mark.parametrize(
    ("ttl", "dns_names"),
    [
        (dt.timedelta(hours=1), ()),
        (dt.timedelta(minutes=5), ()),
        (dt.timedelta(hours=24), ("sidemesh-controller.sidemesh-system.svc",)),
        (dt.timedelta(days=400), ("a.example", "b.example")),  # past the intermediate: clamped
    ],
)
def test_template_tbs_is_the_reference_byte_for_byte(
    authority: keys.SigningAuthority, ttl: dt.timedelta, dns_names: tuple[str, ...]
) -> None:
    template = authority.leaf_template
    assert template is not None, authority.template_error
    key = templates.new_key()
    serial = x509.random_serial_number()
    ref = reference(authority, templates.LeafParams(CART, key.public_key(), ttl, NOW, dns_names), serial)
    tbs = template.tbs(
        serial,
        ref.not_valid_before_utc,
        ref.not_valid_after_utc,
        key_info(key),
        leaf.san_value(CART, dns_names),
    )
    assert tbs == ref.tbs_certificate_bytes


@pytest.mark.parametrize("dns_names", [(), ("sidemesh-controller.sidemesh-system.svc",)])
def test_issued_leaf_has_the_reference_fields_and_verifies(
    authority: keys.SigningAuthority, dns_names: tuple[str, ...]
) -> None:
    key = templates.new_key()
    params = templates.LeafParams(CART, key.public_key(), dt.timedelta(hours=1), NOW, dns_names)
    issued = issuer.sign(authority, params)
    ours = x509.load_pem_x509_certificate(issued.chain_pem[0].encode())
    assert ours.public_bytes(serialization.Encoding.DER) == issued.der
    assert issued.chain_pem[0] == ours.public_bytes(serialization.Encoding.PEM).decode()
    assert_same_fields(ours, reference(authority, params, issued.serial))
    assert ours.serial_number == issued.serial and issued.serial_hex == format(ours.serial_number, "x")
    assert issued.not_after == ours.not_valid_after_utc == NOW.replace(microsecond=0) + dt.timedelta(hours=1)
    assert ours.not_valid_before_utc == NOW.replace(microsecond=0) - templates.BACKDATE
    ours.verify_directly_issued_by(authority.cert)
    ski = ours.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def test_independent_checkers_accept_a_template_leaf(
    authority: keys.SigningAuthority, tmp_path: Path
) -> None:
    key = templates.new_key()
    now = dt.datetime.now(UTC)
    issued = issuer.sign(authority, templates.LeafParams(CART, key.public_key(), dt.timedelta(hours=1), now))
    chain = "".join(issued.chain_pem).encode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    svid = X509Svid.parse(chain, key_pem)  # the spiffe package: an independent X.509-SVID parser
    assert str(svid.spiffe_id) == str(CART)
    assert svid.leaf.serial_number == issued.serial
    for purpose in ("sslclient", "sslserver"):
        said = pki.openssl_verify(
            tmp_path, issued.chain_pem[0], chain.decode(), "".join(issued.bundle_pem), purpose
        )
        assert said is None, said


def test_reference_builder_signs_when_there_is_no_template(tmp_path: Path) -> None:
    authority = ec_authority(tmp_path)
    object.__setattr__(authority, "leaf_template", None)  # as if the template's check had failed
    key = templates.new_key()
    params = templates.LeafParams(CART, key.public_key(), dt.timedelta(hours=1), NOW)
    issued = issuer.sign(authority, params)
    ours = issued.certificate
    assert_same_fields(ours, reference(authority, params, issued.serial))
    ours.verify_directly_issued_by(authority.cert)


def test_a_template_that_differs_from_the_reference_is_refused(tmp_path: Path) -> None:
    authority = ec_authority(tmp_path)
    assert authority.leaf_template is not None and authority.template_error is None
    wrong = dataclasses.replace(authority.leaf_template, issuer_name=x509.Name([]).public_bytes())
    with pytest.raises(leaf.TemplateMismatch, match="differs from the reference"):
        wrong._check_against_reference(authority.cert, authority.key, authority.chain)


def test_nothing_is_issued_once_the_signing_certificate_has_expired(tmp_path: Path) -> None:
    authority = ec_authority(tmp_path, dt.timedelta(hours=2))
    later = authority.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    params = templates.LeafParams(CART, templates.new_key().public_key(), dt.timedelta(hours=1), later)
    with pytest.raises(SigningUnavailable):
        issuer.sign(authority, params)


def test_pem_is_what_cryptography_writes(tmp_path: Path) -> None:
    cert = ec_authority(tmp_path).cert
    assert (
        leaf.pem(cert.public_bytes(serialization.Encoding.DER))
        == cert.public_bytes(serialization.Encoding.PEM).decode()
    )


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_subject_key_id_is_what_cryptography_computes(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    expected = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert leaf.subject_key_id(key_info(key)) == expected
