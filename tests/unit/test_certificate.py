"""The workload side's certificate reader (pure), field by field against cryptography's."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca import templates
from sidemesh.identity.certificate import Certificate, CertificateError, load_pem_certificates
from sidemesh.spiffe import SpiffeId
from tests.support import pki

UTC = dt.UTC
CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")


def _build(
    name: x509.Name,
    *,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    not_before: dt.datetime = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    not_after: dt.datetime = dt.datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC),
    serial: int = 0x1234,
) -> x509.Certificate:
    key = key or templates.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())


def _cases(tmp: Path) -> dict[str, x509.Certificate]:
    authority = pki.make_authority(tmp)
    svid = pki.make_svid(authority, CART)
    return {
        "our leaf": pki.crypto(svid.leaf),
        "our intermediate": authority.chain[0],
        "our root": authority.roots[0],
        "RSA root, escaped and multi-valued names, no extensions": _build(
            x509.Name(
                [
                    x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")]),
                    x509.RelativeDistinguishedName(
                        [
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Acme, "Ltd" +1; <x>'),
                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "#ops "),
                        ]
                    ),
                    x509.RelativeDistinguishedName(
                        [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ca@acme.example")]
                    ),
                    x509.RelativeDistinguishedName(
                        [x509.NameAttribute(NameOID.COMMON_NAME, " Zürich root\\")]
                    ),
                ]
            ),
            key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            serial=2**159 - 1,
        ),
        "GeneralizedTime after 2049, UTCTime before 2000": _build(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "long")]),
            not_before=dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
            not_after=dt.datetime(2051, 6, 1, 0, 0, 0, tzinfo=UTC),
            serial=1,
        ),
        "a CA with signing key usages and several names": _build(
            x509.Name([]),
            extensions=[
                (x509.BasicConstraints(ca=True, path_length=0), True),
                (
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                ),
                (
                    x509.SubjectAlternativeName(
                        [
                            x509.DNSName("a.example"),
                            x509.UniformResourceIdentifier("spiffe://one.example"),
                            x509.RFC822Name("x@y.example"),
                            x509.UniformResourceIdentifier("https://two.example/p"),
                            x509.DNSName("b.example"),
                        ]
                    ),
                    False,
                ),
            ],
        ),
    }


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def test_every_field_reads_as_cryptography_reads_it(tmp_path: Path) -> None:
    for what, ref in _cases(tmp_path).items():
        der = ref.public_bytes(serialization.Encoding.DER)
        ours = Certificate.from_der(der)
        bc, ku, san = (
            _extension(ref, c) for c in (x509.BasicConstraints, x509.KeyUsage, x509.SubjectAlternativeName)
        )
        assert (
            ours.serial_number,
            ours.not_valid_before_utc,
            ours.not_valid_after_utc,
            ours.subject,
            ours.public_key_info,
            ours.is_ca,
            ours.key_cert_sign,
            ours.crl_sign,
            ours.has_san,
            list(ours.uris),
            list(ours.dns_names),
            ours.extension_error,
            ours.pem,
        ) == (
            ref.serial_number,
            ref.not_valid_before_utc,
            ref.not_valid_after_utc,
            ref.subject.rfc4514_string(),
            ref.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            bool(bc and bc.ca),
            bool(ku and ku.key_cert_sign),
            bool(ku and ku.crl_sign),
            san is not None,
            san.get_values_for_type(x509.UniformResourceIdentifier) if san else [],
            san.get_values_for_type(x509.DNSName) if san else [],
            None,
            ref.public_bytes(serialization.Encoding.PEM),
        ), what


def test_pem_blocks_are_read_in_order_past_other_text(tmp_path: Path) -> None:
    authority = pki.make_authority(tmp_path)
    key = serialization.Encoding.PEM
    bundle = (
        b"# the mesh's roots\n"
        + authority.roots[0].public_bytes(key)
        + b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        + authority.chain[0].public_bytes(key).replace(b"\n", b"\r\n")
    )
    got = load_pem_certificates(bundle)
    assert [c.der for c in got] == [
        c.public_bytes(serialization.Encoding.DER) for c in (authority.roots[0], authority.chain[0])
    ]
    assert got[0] == Certificate.from_der(got[0].der) and len({*got, *got}) == 2  # equal and hashed by DER


@pytest.mark.parametrize(
    ("pem", "error"),
    [
        (b"", "no PEM certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "not base64"),
        (b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "not a DER X.509 certificate"),
    ],
)
def test_what_is_not_pem_certificates_is_refused_by_name(pem: bytes, error: str) -> None:
    with pytest.raises(CertificateError, match=error):
        load_pem_certificates(pem)


def test_truncated_or_padded_der_is_refused(tmp_path: Path) -> None:
    der = pki.make_svid(pki.make_authority(tmp_path), CART).leaf.der
    for end in range(len(der)):
        with pytest.raises(CertificateError):
            Certificate.from_der(der[:end])
    with pytest.raises(CertificateError, match="one SEQUENCE"):
        Certificate.from_der(der + b"\x00")


def test_a_duplicated_extension_is_kept_as_unreadable(tmp_path: Path) -> None:
    """RFC 5280 4.2: an extension appears at most once. The certificate is read; its extensions
    are not trusted (the leaf checks refuse it, a root is not taken for any trust domain)."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(CART))])
    other = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), san.public_bytes())
    cert = _build(x509.Name([]), extensions=[(san, False), (other, False)])
    # (cryptography builds no duplicate: its OID turned into the SAN's; signatures are not read here)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x06\x03\x55\x1d\x63") == 1
    ours = Certificate.from_der(der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11"))
    assert ours.extension_error is not None and "appears twice" in ours.extension_error


_LEAF = None


def _leaf_der() -> bytes:
    global _LEAF
    if _LEAF is None:
        _LEAF = _build(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidemesh")]),
            extensions=[(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(CART))]), True)],
        ).public_bytes(serialization.Encoding.DER)
    return _LEAF


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_corrupted_certificate_is_read_or_refused_never_a_crash(data: st.DataObject) -> None:
    der = bytearray(_leaf_der())
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(CertificateError):
        Certificate.from_der(bytes(der))


def _by_hand(*optional: bytes, ext_oid: bytes = b"\x55\x1d\x11", ext_value: bytes = b"\x30\x00") -> bytes:
    """A certificate assembled field by field (ca.der): a P-256 key's SPKI, one extension (or the
    optional TBSCertificate fields given), an empty signature (never checked here)."""
    from ca import der

    spki = (
        pki.make_authority.__globals__["templates"]
        .new_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    alg = der.sequence(der.oid("1.2.840.10045.4.3.2"))
    when = dt.datetime(2026, 1, 1, tzinfo=UTC)
    extension = der.explicit(
        3, der.sequence(der.sequence(der.tlv(der.OID, ext_oid), der.tlv(der.OCTET_STRING, ext_value)))
    )
    tbs = der.sequence(
        der.explicit(0, der.integer(2)),
        der.integer(7),
        alg,
        der.sequence(),
        der.sequence(der.time(when), der.time(when + dt.timedelta(days=1))),
        der.sequence(),
        spki,
        *(optional or (extension,)),
    )
    return der.sequence(tbs, alg, der.bit_string(b""))


def test_a_certificate_assembled_by_hand_is_read() -> None:
    cert = Certificate.from_der(_by_hand(ext_value=b"\x30\x0a\x86\x08spiffe:x"))
    assert (cert.serial_number, cert.uris, cert.extension_error) == (7, ("spiffe:x",), None)


@pytest.mark.parametrize(
    ("optional", "error"),
    [
        ((b"\xa3\x02\x30\x00", b"\xa3\x02\x30\x00"), "unexpected fields"),  # [3] twice
        ((b"\xa3\x02\x30\x00", b"\x81\x01\x00"), "unexpected fields"),  # [1] after [3]
        ((b"\x04\x00",), "unexpected fields"),  # not an optional field at all
    ],
)
def test_optional_fields_only_once_and_in_order(optional: tuple[bytes, ...], error: str) -> None:
    with pytest.raises(CertificateError, match=error):
        Certificate.from_der(_by_hand(*optional))


def test_an_object_identifier_arc_of_any_length_is_refused_not_a_crash() -> None:
    """An arc of 2,100 bytes made int-to-str conversion raise a plain ValueError (Python's 4,300
    digit limit), which escaped the bundle watch and every renewal."""
    huge = b"\x2a" + b"\xff" * 2099 + b"\x7f"
    with pytest.raises(CertificateError, match="arc longer than 20 bytes"):
        Certificate.from_der(_by_hand(ext_oid=huge))
    uuid_arc = b"\x69" + b"\x81" * 18 + b"\x01"  # 2.25.<a 127-bit number>: the longest arcs in use
    assert Certificate.from_der(_by_hand(ext_oid=uuid_arc)).extension_error is None


@pytest.mark.parametrize(
    "tag",
    [0xA6, 0xA2, 0xA1, 0xA7, 0x80, 0x84, 0x30],  # constructed forms of primitive names, and the reverse
)
def test_a_general_name_of_an_undefined_form_makes_the_san_unreadable(tag: int) -> None:
    """A URI SAN in BER's constructed form (A6 { IA5String }): OpenSSL reads a URI there, Go and
    this reader's earlier version passed it over, so a root naming another trust domain that way
    was taken for ours. Now such a SAN cannot be read (the root is nobody's, a leaf is refused)."""
    from ca import der

    name = der.tlv(tag, der.tlv(0x16, b"spiffe://partner.example"))
    cert = Certificate.from_der(_by_hand(ext_value=der.sequence(name)))
    assert cert.extension_error is not None and f"{tag:#04x}" in cert.extension_error


def test_a_root_that_openssl_refuses_is_refused_with_the_bundle(tmp_path: Path) -> None:
    """This reader checks the fields it reads; a root damaged elsewhere (here the OID tag of the
    TBSCertificate's signature algorithm) passed it, was published by the controller and then
    failed every TLS context built with it. load_bundle has OpenSSL load each root."""
    from sidemesh.identity.svid import SvidError, load_bundle

    root = pki.make_authority(tmp_path).roots[0]
    der = bytearray(root.public_bytes(serialization.Encoding.DER))
    at = der.index(b"\x30\x0a\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02") + 2  # ecdsa-with-SHA256's OID tag
    der[at] ^= 0x02  # OID (06) -> OCTET STRING (04)
    Certificate.from_der(bytes(der))  # (read here: the algorithm is not one of the fields it reads)
    with pytest.raises(SvidError, match="refused by OpenSSL"):
        load_bundle(Certificate.from_der(bytes(der)).pem)
    assert load_bundle(root.public_bytes(serialization.Encoding.PEM))  # the undamaged root loads
