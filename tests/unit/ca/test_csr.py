"""CSR validation (pure): what is taken from a CSR, and the encodings that take another path."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
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


def hand_made_csr(
    key: ec.EllipticCurvePrivateKey,
    public_key_info: bytes,
    label: str = "CERTIFICATE REQUEST",
    digest: hashes.HashAlgorithm = SHA256,
) -> str:
    """A PKCS#10 request with exactly the SubjectPublicKeyInfo given, signed by ``key``."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(CART))]).public_bytes()
    extension = der.sequence(der.oid("2.5.29.17"), der.tlv(der.OCTET_STRING, san))
    request = der.sequence(der.oid("1.2.840.113549.1.9.14"), der.tlv(0x31, der.sequence(extension)))
    info = der.sequence(der.integer(0), der.sequence(), public_key_info, der.tlv(0xA0, request))
    signature = key.sign(info, ec.ECDSA(digest))
    algorithm = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3"}[digest.name]
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
