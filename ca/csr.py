"""Validation of a workload's CSR against its authenticated identity (no I/O).

Only the public key is taken from a CSR that passes; everything else in the certificate is written
by the CA. Each refusal says why, in words the operator of the workload can act on.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from ca import der
from ca.errors import IdentityMismatch, InvalidRequest
from ca.templates import EXTENSION_ERRORS
from sidemesh.spiffe import SpiffeId, SpiffeIdError

MAX_CSR_BYTES = 16 * 1024
_PEM = re.compile(
    r"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----([A-Za-z0-9+/=\s]*)-----END (?:NEW )?CERTIFICATE REQUEST-----",
    re.ASCII,
)
# SubjectPublicKeyInfo of every ECDSA P-256 key in uncompressed form, up to the point's 64 bytes.
_P256_KEY_INFO = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")
_P256_KEY_INFO_LENGTH = len(_P256_KEY_INFO) + 64
_NOT_A_CSR = "csr is not a PEM-encoded PKCS#10 certificate request"
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_ECDSA_WITH_SHA256 = SignatureAlgorithmOID.ECDSA_WITH_SHA256
_BASIC_CONSTRAINTS = ExtensionOID.BASIC_CONSTRAINTS
_SUBJECT_ALT_NAME = ExtensionOID.SUBJECT_ALTERNATIVE_NAME


@dataclass(frozen=True, slots=True)
class ValidCSR:
    public_key_info: bytes  # the ECDSA P-256 key's SubjectPublicKeyInfo, DER, uncompressed point
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...] = ()


def parse_csr(pem: str) -> tuple[x509.CertificateSigningRequest, bytes]:
    """The parsed request and its DER. The PEM armour is taken off here (cheaper than
    ``load_pem_x509_csr`` and then asking for the DER back); ``cryptography`` parses the DER."""
    if not pem.strip():
        raise InvalidRequest("csr is empty")
    # (a character is at most 4 bytes of UTF-8: a short text need not be encoded to be measured)
    if len(pem) > MAX_CSR_BYTES // 4 and len(pem.encode("utf-8", "replace")) > MAX_CSR_BYTES:
        raise InvalidRequest(f"csr is larger than {MAX_CSR_BYTES} bytes")
    match = _PEM.search(pem)
    if match is None:
        raise InvalidRequest(_NOT_A_CSR, "no PEM CERTIFICATE REQUEST block")
    try:
        data = binascii.a2b_base64(match.group(1).encode("ascii"), strict_mode=False)
        return x509.load_der_x509_csr(data), data
    except (binascii.Error, ValueError, x509.InvalidVersion) as exc:  # (InvalidVersion: not a ValueError)
        raise InvalidRequest(_NOT_A_CSR, str(exc)) from exc


def _public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # a point off the curve, an unknown curve
        raise InvalidRequest("csr public key is not a valid key", str(exc)) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise InvalidRequest(f"csr key must be ECDSA P-256 (secp256r1), got {kind}")
    return key


_WEAK_SIGNATURES = {
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA1: "ecdsa-with-SHA1",
    x509.SignatureAlgorithmOID.RSA_WITH_SHA1: "sha1WithRSAEncryption",
    x509.SignatureAlgorithmOID.RSA_WITH_MD5: "md5WithRSAEncryption",
}


def _check_possession(
    csr: x509.CertificateSigningRequest, key: ec.EllipticCurvePublicKey, tbs: bytes
) -> None:
    """The CSR is signed by the key it carries. ecdsa-with-SHA256, what every client sends, is checked
    directly over ``tbs``, the CertificationRequestInfo as received (``is_signature_valid`` builds the
    key and the algorithm object again for each call, ``tbs_certrequest_bytes`` encodes it again)."""
    oid = csr.signature_algorithm_oid
    if oid in _WEAK_SIGNATURES:  # (refused by cryptography too, as "does not verify": the real reason)
        raise InvalidRequest(
            f"csr is signed with {_WEAK_SIGNATURES[oid]}, which the CA does not accept: sign it with "
            "ecdsa-with-SHA256"
        )
    try:
        if oid == _ECDSA_WITH_SHA256:
            key.verify(csr.signature, tbs, _ECDSA_SHA256)
            return
        if csr.is_signature_valid:
            return
    except InvalidSignature:
        pass
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest("csr signature cannot be checked", str(exc)) from exc
    raise InvalidRequest("csr signature does not verify with its own public key (proof of possession failed)")


def _parts(csr: x509.CertificateSigningRequest, data: bytes) -> tuple[bytes, bytes]:
    """(CertificationRequestInfo, SubjectPublicKeyInfo) exactly as encoded in ``data``, which
    ``cryptography`` has parsed and accepted; the info from ``cryptography`` and no key info (the
    key is then encoded again) should the bytes be other than expected."""
    try:
        return der.csr_info_and_key_info(data)
    except der.DERError:
        return csr.tbs_certrequest_bytes, b""


def _key_info(info: bytes, key: ec.EllipticCurvePublicKey) -> bytes:
    """The SubjectPublicKeyInfo to certify, uncompressed: as sent when it is (nearly always) so."""
    if len(info) == _P256_KEY_INFO_LENGTH and info.startswith(_P256_KEY_INFO):
        return info
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _requested(
    san: x509.SubjectAlternativeName | None, allowed_dns: frozenset[str], expected: SpiffeId
) -> tuple[SpiffeId, tuple[str, ...]]:
    """The SPIFFE ID (and allowed DNS names) the CSR asks for; ``expected`` itself when the URI is
    its exact text (what a workload sends), without parsing it again."""
    if san is None:
        raise InvalidRequest("csr has no subjectAltName; it must carry exactly one URI SAN (the SPIFFE ID)")
    uris: list[str] = []
    dns: list[str] = []
    others: list[x509.GeneralName] = []
    for name in san:  # one pass over the names (rather than one per kind)
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        else:
            if isinstance(name, x509.DNSName):
                dns.append(name.value)
            others.append(name)
    if dns and allowed_dns and set(dns) <= allowed_dns and len(others) == len(dns):
        others = []  # DNS names the operator allows for this (control-plane) identity
    if others:
        kinds = sorted({type(name).__name__ for name in others})
        why = f"csr may carry only a URI SAN, found {', '.join(kinds)}"
        if dns:  # a control-plane identity the operator has not listed, or other names than listed
            why += (
                f" (DNS names {', '.join(sorted(dns))} are signed only for the identities and names in the "
                "CA's --control-plane-dns)"
            )
        raise InvalidRequest(why)
    if len(uris) != 1:
        raise InvalidRequest(f"csr must carry exactly one URI SAN, found {len(uris)}")
    if uris[0] == str(expected):
        return expected, tuple(dns)
    try:
        return SpiffeId.parse(uris[0]), tuple(dns)
    except SpiffeIdError as exc:
        raise InvalidRequest(f"csr URI SAN is not a SPIFFE ID: {exc}") from exc


def validate_csr(pem: str, expected: SpiffeId, allowed_dns: frozenset[str] = frozenset()) -> ValidCSR:
    """Check the CSR and that it asks for ``expected`` (the caller's authenticated identity).

    A DNS SAN is refused unless it is one of ``allowed_dns``, the names the operator allows for this
    identity (the controller's serving name, so that gRPC clients can verify it by name)."""
    csr, data = parse_csr(pem)
    constraints: x509.BasicConstraints | None = None
    san: x509.SubjectAlternativeName | None = None
    try:
        for extension in csr.extensions:  # one pass (get_extension_for_class raises for a missing one)
            oid = extension.oid
            if oid == _BASIC_CONSTRAINTS:
                constraints = extension.value
            elif oid == _SUBJECT_ALT_NAME:
                san = extension.value
    except EXTENSION_ERRORS as exc:
        # duplicate or undecodable extensions, a SAN of a kind cryptography cannot read (x400Address)
        raise InvalidRequest("csr has malformed extensions", str(exc)) from exc
    key = _public_key(csr)
    info, key_info = _parts(csr, data)
    _check_possession(csr, key, info)
    if constraints is not None and constraints.ca:
        raise InvalidRequest("csr asks for CA:true; workload certificates are never CAs")
    requested, dns = _requested(san, allowed_dns, expected)
    if requested != expected:
        raise IdentityMismatch(
            f"csr asks for {requested} but the token authenticates {expected}; a workload may only "
            "request its own identity"
        )
    return ValidCSR(_key_info(key_info, key), expected, dns)
