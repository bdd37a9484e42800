"""The trust bundle as a SPIFFE bundle (no I/O): the JWK Set of the SPIFFE Trust Domain and
Bundle specification, with the X509-SVID standard's entries (section 6.1): one JWK per root CA,
``"use": "x509-svid"``, ``x5c`` holding exactly that certificate (base64 DER), no ``kid``.

What a SPIFFE implementation (SPIRE, go-spiffe, Envoy's SPIFFE validator) reads to trust our
SVIDs, for federation; the mesh itself distributes PEM (``root-cert.pem``)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidemesh.identity.certificate import Certificate

_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


def _b64url(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def _public_jwk(cert: x509.Certificate) -> dict[str, str]:
    """The certificate's public key as the JWK members RFC 7518 section 6 defines."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        crv, size = _CURVES[key.curve.name]
        point = key.public_numbers()
        return {"kty": "EC", "crv": crv, "x": _b64url(point.x, size), "y": _b64url(point.y, size)}
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        n, e = rsa_numbers.n, rsa_numbers.e
        return {
            "kty": "RSA",
            "n": _b64url(n, (n.bit_length() + 7) // 8),
            "e": _b64url(e, (e.bit_length() + 7) // 8),
        }
    raise ValueError(f"a {type(key).__name__} key has no JWK form here (EC P-256/384/521 or RSA)")


def spiffe_bundle(
    roots: Sequence[Certificate], *, refresh_hint: int | None = None, sequence: int | None = None
) -> dict[str, Any]:
    """The roots as a SPIFFE bundle document; ``refresh_hint`` in seconds."""
    if not roots:
        raise ValueError("a trust bundle holds at least one root")
    keys = []
    for cert in roots:
        jwk = _public_jwk(x509.load_der_x509_certificate(cert.der))
        keys.append({**jwk, "use": "x509-svid", "x5c": [base64.b64encode(cert.der).decode()]})
    doc: dict[str, Any] = {"keys": keys}
    if refresh_hint is not None:
        doc["spiffe_refresh_hint"] = refresh_hint
    if sequence is not None:
        doc["spiffe_sequence"] = sequence
    return doc
