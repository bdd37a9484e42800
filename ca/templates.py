"""Certificate templates: params -> template -> sign (no I/O).

The CA writes every extension of a workload certificate itself and copies nothing from the CSR but
its public key. Leaf certificates follow the SPIFFE X.509-SVID profile.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidemesh.spiffe import SpiffeId

# What reading a certificate's extensions with cryptography raises when it cannot (malformed,
# duplicated, a name type it does not know, and since cryptography 51 an empty SAN, IAN or
# certificatePolicies).
EXTENSION_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)

BACKDATE = dt.timedelta(minutes=1)

PublicKey = ec.EllipticCurvePublicKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_name(common_name: str, trust_domain: str) -> x509.Name:
    """O=sidemesh, OU=<trust domain>, CN=...; a trust domain longer than an OU may be (RFC 5280
    ub-organizational-unit-name, 64) is left out of the name (the URI SAN names it anyway)."""
    unit = (
        [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain)]
        if len(trust_domain) <= 64
        else []
    )
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidemesh"),
            *unit,
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_extensions(
    builder: x509.CertificateBuilder, key: PublicKey, path_length: int, trust_domain: str
) -> x509.CertificateBuilder:
    """A signing certificate's extensions. It is an SVID of the trust domain itself (X509-SVID 3.2:
    a signing certificate SHOULD be one, its SPIFFE ID without a path)."""
    trust_domain_id = x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.SubjectAlternativeName([trust_domain_id]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,  # X509-SVID appendix A: set if and only if the SVID is a leaf
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )


def root_certificate(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: dt.datetime, lifetime: dt.timedelta
) -> x509.Certificate:
    """A self-signed root for ``trust_domain``. path_length 1: root -> intermediate -> leaf."""
    name = _ca_name(f"sidemesh root CA {now:%Y-%m-%d}", trust_domain)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
    )
    return _ca_extensions(builder, key.public_key(), 1, trust_domain).sign(key, hashes.SHA256())


def authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of a certificate ``issuer`` signs: the issuer's own SKI when it has one (RFC 5280
    4.2.1.1; OpenSSL and BoringSSL look the issuer up by it, and an operator's intermediate may
    derive its SKI otherwise, e.g. RFC 7093's truncated SHA-256), else the SHA-1 of its key."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def intermediate_certificate(
    key: PublicKey,
    trust_domain: str,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    not_after = min(now + lifetime, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(f"sidemesh intermediate CA {now:%Y-%m-%d}", trust_domain))
        .issuer_name(issuer.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(authority_key_id(issuer), critical=False)
    )
    return _ca_extensions(builder, key, 0, trust_domain).sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class LeafParams:
    spiffe_id: SpiffeId
    public_key: PublicKey
    ttl: dt.timedelta
    now: dt.datetime
    dns_names: tuple[str, ...] = ()  # only for the control plane's own serving certificates


def leaf_not_after(now: dt.datetime, ttl: dt.timedelta, chain: Sequence[x509.Certificate]) -> dt.datetime:
    """notAfter of a leaf: now + ttl, but never past any certificate above it."""
    return min([now + ttl, *(c.not_valid_after_utc for c in chain)])


def leaf_builder(
    params: LeafParams,
    issuer: x509.Certificate,
    chain: Sequence[x509.Certificate],
    serial: int | None = None,
    not_after: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    """An X.509-SVID: exactly one URI SAN, CA:false, digitalSignature, serverAuth + clientAuth.

    The subject is empty (the identity is the URI SAN alone), so the SAN extension is critical
    as RFC 5280 requires. This is the reference the CA's DER template (``ca.leaf``) is checked
    against; ``serial`` is random unless given (for that check); ``not_after`` is the issuer's
    (its authority's limit counts the root the chain ends at), else ``leaf_not_after``'s.
    """
    not_before = max(params.now - BACKDATE, issuer.not_valid_before_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(params.spiffe_id))]
    sans += [x509.DNSName(name) for name in params.dns_names]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(params.public_key)
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(not_before)
        .not_valid_after(leaf_not_after(params.now, params.ttl, chain) if not_after is None else not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(params.public_key), critical=False)
        .add_extension(authority_key_id(issuer), critical=False)
    )
