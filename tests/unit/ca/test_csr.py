"""CSR validation (pure): what is taken from a CSR, and the encodings that take another path."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import der
from ca.csr import validate_csr
from ca.errors import InvalidRequest
from sidemesh.identity.svid import make_csr, new_key
from sidemesh.spiffe import SpiffeId

CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
SHA256 = hashes.SHA256()


def key_info(key: ec.EllipticCurvePrivateKey, fmt: serialization.PublicFormat) -> bytes:
    if fmt is serialization.PublicFormat.SubjectPublicKeyInfo:
        return key.public_key().public_bytes(serialization.Encoding.DER, fmt)
    point = key.public_key().public_bytes(serialization.Encoding.X962, fmt)
    algorithm = der.sequence(der.oid("1.2.840.10045.2.1"), der.oid("1.2.840.10045.3.1.7"))
    return der.sequence(algorithm, der.bit_string(point))


def san_extension(names: bytes) -> bytes:
    """A subjectAltName extension holding the GeneralNames ``names`` (DER, as given)."""
    return der.sequence(der.oid("2.5.29.17"), der.tlv(der.OCTET_STRING, der.tlv(der.SEQUENCE, names)))


def hand_made_csr(
    key: ec.EllipticCurvePrivateKey,
    public_key_info: bytes,
    label: str = "CERTIFICATE REQUEST",
    digest: hashes.HashAlgorithm = SHA256,
    extensions: list[bytes] | None = None,
) -> str:
    """A PKCS#10 request with exactly the SubjectPublicKeyInfo given, signed by ``key``; its
    extensions are ``extensions`` (DER), by default the one URI SAN."""
    if extensions is None:
        extensions = [san_extension(der.tlv(0x86, str(CART).encode()))]
    request = der.sequence(der.oid("1.2.840.113549.1.9.14"), der.tlv(0x31, der.sequence(*extensions)))
    info = der.sequence(der.integer(0), der.sequence(), public_key_info, der.tlv(0xA0, request))
    signature = key.sign(info, ec.ECDSA(digest))
    algorithm = {
        "sha1": "1.2.840.10045.4.1",
        "sha256": "1.2.840.10045.4.3.2",
        "sha384": "1.2.840.10045.4.3.3",
    }[digest.name]
    data = der.sequence(info, der.sequence(der.oid(algorithm)), der.bit_string(signature))
    body = base64.encodebytes(data).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"


def test_the_usual_csr_gives_its_key_info_as_encoded() -> None:
    key = new_key()
    valid = validate_csr(make_csr(key, CART), CART)
    assert valid.public_key_info == key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert valid.spiffe_id == CART and valid.dns_names == ()


def test_a_compressed_point_is_certified_in_the_uncompressed_form() -> None:
    key = new_key()
    csr = hand_made_csr(key, key_info(key, serialization.PublicFormat.CompressedPoint))
    valid = validate_csr(csr, CART)
    assert valid.public_key_info == key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_new_certificate_request_label_and_surrounding_text_are_accepted() -> None:
    key = new_key()
    csr = hand_made_csr(
        key, key_info(key, serialization.PublicFormat.UncompressedPoint), "NEW CERTIFICATE REQUEST"
    )
    assert validate_csr("some text before\n" + csr + "and after\n", CART).spiffe_id == CART


def test_a_point_off_the_curve_is_a_clear_refusal() -> None:
    key = new_key()
    info = bytearray(key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo))
    info[-1] ^= 0x01  # no longer on P-256
    with pytest.raises(InvalidRequest, match="not a valid key"):
        validate_csr(hand_made_csr(key, bytes(info)), CART)


def spki(algorithm: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return der.sequence(algorithm, der.bit_string(point))


@pytest.mark.parametrize(
    "algorithm",
    [
        der.sequence(der.oid("1.2.643.2.2.19")),  # GOST R 34.10-2001: a key algorithm OpenSSL does not know
        der.sequence(der.oid("1.2.840.10045.2.1"), der.oid("1.2.3.4.5")),  # EC on a curve nobody knows
    ],
    ids=["unknown key algorithm", "unknown curve"],
)
def test_an_unknown_key_algorithm_or_curve_is_a_clear_refusal(algorithm: bytes) -> None:
    """cryptography raises UnsupportedAlgorithm (not a ValueError) for these: the CA answered
    UNKNOWN, which clients retry, with a traceback in its log, instead of INVALID_ARGUMENT."""
    key = new_key()
    with pytest.raises(InvalidRequest, match="not a valid key"):
        validate_csr(hand_made_csr(key, spki(algorithm, key)), CART)


@pytest.mark.parametrize(
    "extensions",
    [
        [san_extension(der.tlv(0x86, str(CART).encode()))] * 2,
        [san_extension(der.tlv(0x86, str(CART).encode()) + der.tlv(0xA3, der.sequence()))],
    ],
    ids=["the SAN twice", "an x400Address in the SAN"],
)
def test_extensions_cryptography_cannot_read_are_a_clear_refusal(extensions: list[bytes]) -> None:
    """DuplicateExtension and UnsupportedGeneralNameType are not ValueErrors either."""
    key = new_key()
    info = key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InvalidRequest, match="malformed extensions"):
        validate_csr(hand_made_csr(key, info, extensions=extensions), CART)


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\u2003\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIB",
    ],
)
def test_broken_armour_is_not_a_csr(text: str) -> None:
    with pytest.raises(InvalidRequest, match="not a PEM-encoded PKCS#10"):
        validate_csr(text, CART)


def test_proof_of_possession_is_still_checked() -> None:
    key, other = new_key(), new_key()
    csr = hand_made_csr(other, key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(InvalidRequest, match="proof of possession"):
        validate_csr(csr, CART)


def test_other_ecdsa_digests_are_checked_too() -> None:
    key, other = new_key(), new_key()
    info = key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert validate_csr(hand_made_csr(key, info, digest=hashes.SHA384()), CART).public_key_info == info
    with pytest.raises(InvalidRequest, match="proof of possession"):
        validate_csr(hand_made_csr(other, info, digest=hashes.SHA384()), CART)


def test_a_sha1_signature_is_refused_by_its_name() -> None:
    """openssl req -verify takes it; the CA refused it as "proof of possession failed", which sent
    the client looking for a key mix-up instead of its digest."""
    key = new_key()
    csr = hand_made_csr(
        key, key_info(key, serialization.PublicFormat.SubjectPublicKeyInfo), digest=hashes.SHA1()
    )
    with pytest.raises(InvalidRequest, match=r"signed with ecdsa-with-SHA1.*sign it with ecdsa-with-SHA256"):
        validate_csr(csr, CART)


def test_a_csr_version_other_than_v1_is_not_a_csr() -> None:
    """cryptography raises InvalidVersion (not a ValueError) for it: it went through as an
    unexpected error, gRPC UNKNOWN (retried by clients), with no refusal logged or counted."""
    pem = make_csr(new_key(), CART)
    data = bytearray(base64.b64decode("".join(pem.strip().splitlines()[1:-1])))
    at = data.index(b"\x02\x01\x00")  # CertificationRequestInfo's version: INTEGER 0 (v1)
    data[at + 2] = 5
    text = "-----BEGIN CERTIFICATE REQUEST-----\n" + base64.b64encode(bytes(data)).decode()
    text += "\n-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(InvalidRequest, match="not a PEM-encoded PKCS#10"):
        validate_csr(text, CART)
