"""Certificates the CA would never issue, for the negative tests."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import keys, templates
from sidemesh.identity.certificate import Certificate
from sidemesh.identity.svid import SVID, certificate_of
from sidemesh.spiffe import SpiffeId


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def lite(certs: Sequence[x509.Certificate]) -> tuple[Certificate, ...]:
    """cryptography's certificates as an SVID holds them."""
    return tuple(map(certificate_of, certs))


def crypto(cert: Certificate) -> x509.Certificate:
    """An SVID's certificate as cryptography reads it (for its verify and extension APIs)."""
    return x509.load_der_x509_certificate(cert.der)


def make_authority(
    tmp: Path, trust_domain: str = "cluster.local", **kw: dt.timedelta
) -> keys.SigningAuthority:
    return keys.bootstrap(tmp, trust_domain, now(), **kw)


def make_svid(
    authority: keys.SigningAuthority, spiffe_id: SpiffeId, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> SVID:
    """An SVID signed directly by ``authority`` with the CA's own template."""
    key = templates.new_key()
    params = templates.LeafParams(spiffe_id, key.public_key(), ttl, now())
    cert = templates.leaf_builder(params, authority.cert, authority.chain).sign(
        authority.key, hashes.SHA256()
    )
    return SVID.of(spiffe_id, key, (cert, *authority.chain), authority.roots)


def expired_svid(authority: keys.SigningAuthority, spiffe_id: SpiffeId) -> SVID:
    """Our CA's template and signature, but valid from two hours ago to one hour ago."""
    key = templates.new_key()
    params = templates.LeafParams(spiffe_id, key.public_key(), dt.timedelta(hours=1), now())
    good = templates.leaf_builder(params, authority.cert, authority.chain).sign(
        authority.key, hashes.SHA256()
    )
    cert = reissued(good, authority.key, now() - dt.timedelta(hours=2), now() - dt.timedelta(hours=1))
    return SVID.of(spiffe_id, key, (cert, *authority.chain), authority.roots)


def reissued(
    cert: x509.Certificate,
    signer: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """``cert`` again, same names, key and extensions, with another validity (and a new serial)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(signer, hashes.SHA256())


def self_signed_svid(spiffe_id: SpiffeId) -> SVID:
    key = templates.new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "self")]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "self")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(minutes=1))
        .not_valid_after(now() + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return SVID.of(spiffe_id, key, (cert,), (cert,))


def csr_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    sans: list[x509.GeneralName],
    ca: bool | None = None,
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def csr_signed_by_other_key(spiffe_id: SpiffeId) -> str:
    """A CSR carrying key A's public key but signed by key B (no proof of possession of A)."""
    key_a, key_b = templates.new_key(), templates.new_key()
    honest = x509.load_pem_x509_csr(csr_pem(key_a, [x509.UniformResourceIdentifier(str(spiffe_id))]).encode())
    tbs = honest.tbs_certrequest_bytes
    signature = key_b.sign(tbs, ec.ECDSA(hashes.SHA256()))
    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    bits = b"\x03" + _der_len(len(signature) + 1) + b"\x00" + signature
    body = tbs + alg + bits
    der = b"\x30" + _der_len(len(body)) + body
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def leaf_with(
    authority: keys.SigningAuthority,
    uris: list[str],
    *,
    ca: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
    digital_signature: bool = True,
    basic_constraints: bool = True,
    key_usage: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    """A certificate our CA signed (for ``key``, default a new one), with the leaf profile bent: a
    CA flag, signing key usages, no digitalSignature, either extension left out, any URI SANs (the
    negative twins of the X509-SVID leaf checks)."""
    key = key or templates.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(minutes=1))
        .not_valid_after(now() + dt.timedelta(hours=1))
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not digital_signature,  # (a key usage needs a bit set)
                key_cert_sign=key_cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return (
        builder.add_extension(
            # No URI: a DNS name alone (cryptography 51 refuses an empty SAN, as RFC 5280 does).
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u) for u in uris] or [x509.DNSName("cart.shop")]
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.cert.public_key()), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )


def openssl_verify(tmp: Path, leaf_pem: str, chain_pem: str, roots_pem: str, purpose: str = "") -> str | None:
    """``openssl verify`` of a leaf with its intermediates against the roots (OpenSSL, as Envoy's
    BoringSSL and Python's ssl verify): None when it says OK, else what it said. Skips the calling
    test when openssl is not installed."""
    import pytest

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed: the chain is not checked with `openssl verify`")
    for name, text in (("leaf.pem", leaf_pem), ("chain.pem", chain_pem), ("roots.pem", roots_pem)):
        (tmp / name).write_text(text)
    argv = [openssl, "verify", *(["-purpose", purpose] if purpose else []), "-CAfile", str(tmp / "roots.pem")]
    argv += ["-untrusted", str(tmp / "chain.pem"), str(tmp / "leaf.pem")]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return None if out.returncode == 0 and out.stdout.strip().endswith("OK") else out.stdout + out.stderr
