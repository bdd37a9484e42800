"""Validation of a workload's CSR against its authenticated identity (no I/O).

Only the public key is taken from a CSR that passes; everything else in the certificate is written
by the CA. Each refusal says why, in words the operator of the workload can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca.errors import IdentityMismatch, InvalidRequest
from sidemesh.spiffe import SpiffeId, SpiffeIdError

MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class ValidCSR:
    public_key: ec.EllipticCurvePublicKey
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...] = ()


def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    data = pem.encode("utf-8", "replace")
    if not data.strip():
        raise InvalidRequest("csr is empty")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidRequest(f"csr is larger than {MAX_CSR_BYTES} bytes")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise InvalidRequest("csr is not a PEM-encoded PKCS#10 certificate request", str(exc)) from exc


def _requested(
    csr: x509.CertificateSigningRequest, allowed_dns: frozenset[str]
) -> tuple[SpiffeId, tuple[str, ...]]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidRequest(
            "csr has no subjectAltName; it must carry exactly one URI SAN (the SPIFFE ID)"
        ) from None
    dns = tuple(san.get_values_for_type(x509.DNSName))
    others = [name for name in san if not isinstance(name, x509.UniformResourceIdentifier)]
    if dns and allowed_dns and set(dns) <= allowed_dns and len(others) == len(dns):
        others = []  # DNS names the operator allows for this (control-plane) identity
    if others:
        kinds = sorted({type(name).__name__ for name in others})
        raise InvalidRequest(f"csr may carry only a URI SAN, found {', '.join(kinds)}")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidRequest(f"csr must carry exactly one URI SAN, found {len(uris)}")
    try:
        return SpiffeId.parse(uris[0]), dns
    except SpiffeIdError as exc:
        raise InvalidRequest(f"csr URI SAN is not a SPIFFE ID: {exc}") from exc


def validate_csr(pem: str, expected: SpiffeId, allowed_dns: frozenset[str] = frozenset()) -> ValidCSR:
    """Check the CSR and that it asks for ``expected`` (the caller's authenticated identity).

    A DNS SAN is refused unless it is one of ``allowed_dns``, the names the operator allows for this
    identity (the controller's serving name, so that gRPC clients can verify it by name)."""
    csr = parse_csr(pem)
    try:
        extensions = csr.extensions
    except ValueError as exc:  # duplicate or undecodable extensions
        raise InvalidRequest("csr has malformed extensions", str(exc)) from exc
    if not csr.is_signature_valid:
        raise InvalidRequest(
            "csr signature does not verify with its own public key (proof of possession failed)"
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise InvalidRequest(f"csr key must be ECDSA P-256 (secp256r1), got {kind}")
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise InvalidRequest("csr asks for CA:true; workload certificates are never CAs")
    requested, dns = _requested(csr, allowed_dns)
    if requested != expected:
        raise IdentityMismatch(
            f"csr asks for {requested} but the token authenticates {expected}; a workload may only "
            "request its own identity"
        )
    return ValidCSR(key, expected, dns)
