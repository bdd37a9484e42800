"""An X.509-SVID held by a workload (no I/O): key, chain, trust bundle, and checks on them."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidemesh.identity.certificate import Certificate, CertificateError, load_pem_certificates
from sidemesh.spiffe import SpiffeId, SpiffeIdError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec


class SvidError(ValueError):
    """A certificate that is not a valid SVID for what we expected."""


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A private key as the TLS library loads it, and its public half as certificates carry it."""

    pem: bytes = field(repr=False)  # PKCS#8, unencrypted: only ever loaded into memory (tls.py)
    public_key_info: bytes  # the SubjectPublicKeyInfo (DER)

    @classmethod
    def of(cls, key: ec.EllipticCurvePrivateKey) -> PrivateKey:
        """From a ``cryptography`` key (the CA's tools and the tests hold those)."""
        from cryptography.hazmat.primitives import serialization

        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(pem, spki)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 key, with ``cryptography`` (imported here: a sidecar makes its keys in a
    short-lived child process, ``sidemesh.identity.keygen``, and never loads it)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, dns_names: tuple[str, ...] = ()) -> str:
    """A PKCS#10 request for ``spiffe_id``: one URI SAN (and DNS names only for control-plane
    identities the CA allows them for)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidemesh")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(spiffe_id)), *(x509.DNSName(n) for n in dns_names)]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def new_request(spiffe_id: SpiffeId, dns_names: tuple[str, ...] = ()) -> tuple[PrivateKey, str]:
    """A new key and the request (PEM) for ``spiffe_id`` signed with it, in this process."""
    key = new_key()
    return PrivateKey.of(key), make_csr(key, spiffe_id, dns_names)


def spiffe_id_of(cert: Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf X.509-SVID, validated as the X509-SVID standard's leaf validation
    (section 5.2) and profile (4.1, 4.3) say: basicConstraints with cA false, a key usage with
    digitalSignature and without keyCertSign or cRLSign, exactly one URI SAN, a SPIFFE ID with a
    path below the trust domain (as py-spiffe and rust-spiffe check; go-spiffe lets a leaf without
    the two extensions pass). The chain itself is the TLS library's to verify."""
    if cert.extension_error is not None:
        raise SvidError(f"certificate extensions cannot be read: {cert.extension_error}")
    if cert.is_ca:
        raise SvidError("certificate is a CA (basicConstraints CA:true), not a leaf SVID")
    if not cert.basic_constraints:
        raise SvidError("a leaf SVID has basicConstraints with cA false (X509-SVID 4.1); this one has none")
    if cert.key_cert_sign or cert.crl_sign:
        raise SvidError("a leaf SVID must not have keyCertSign or cRLSign in its key usage")
    if not cert.digital_signature:
        what = "has no key usage" if not cert.key_usage else "has a key usage without digitalSignature"
        raise SvidError(f"a leaf SVID's key usage includes digitalSignature (X509-SVID 4.3); this one {what}")
    if not cert.has_san:
        raise SvidError("certificate has no subjectAltName")
    uris = cert.uris
    if len(uris) != 1:
        raise SvidError(f"an X.509-SVID has exactly one URI SAN, this one has {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(f"URI SAN is not a SPIFFE ID: {exc}") from exc
    if not spiffe_id.path:
        raise SvidError(f"{spiffe_id} names a trust domain, not a workload (a leaf SVID's ID has a path)")
    return spiffe_id


def pem_of(certs: Sequence[Certificate]) -> bytes:
    return b"".join(c.pem for c in certs)


@dataclass(frozen=True, slots=True)
class SVID:
    spiffe_id: SpiffeId
    key: PrivateKey
    chain: tuple[Certificate, ...]  # leaf first
    bundle: tuple[Certificate, ...]  # trusted roots

    @property
    def leaf(self) -> Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def chain_pem(self) -> bytes:
        return pem_of(self.chain)

    @property
    def bundle_pem(self) -> bytes:
        return pem_of(self.bundle)

    @property
    def key_pem(self) -> bytes:
        return self.key.pem

    def with_bundle(self, bundle: Sequence[Certificate]) -> SVID:
        return SVID(self.spiffe_id, self.key, self.chain, tuple(bundle))

    @classmethod
    def from_pem(
        cls,
        key: PrivateKey,
        chain_pem: Sequence[str],
        bundle_pem: Sequence[str],
        expected: SpiffeId,
    ) -> SVID:
        """Check what the CA returned: our key, the identity we asked for, a bundle to trust."""
        try:
            chain = [c for pem in chain_pem for c in load_pem_certificates(pem.encode())]
            bundle = [c for pem in bundle_pem for c in load_pem_certificates(pem.encode())]
        except CertificateError as exc:
            raise SvidError(f"CA returned unparsable certificates: {exc}") from exc
        if not chain or not bundle:
            raise SvidError("CA returned an empty certificate chain or trust bundle")
        check_with_openssl([*chain, *bundle])
        if chain[0].public_key_info != key.public_key_info:
            raise SvidError("CA returned a certificate for another key")
        got = spiffe_id_of(chain[0])
        if got != expected:
            raise SvidError(f"CA returned a certificate for {got}, expected {expected}")
        return cls(expected, key, tuple(chain), own_roots(bundle, expected.trust_domain))

    @classmethod
    def of(
        cls,
        spiffe_id: SpiffeId,
        key: ec.EllipticCurvePrivateKey,
        chain: Sequence[x509.Certificate],
        bundle: Sequence[x509.Certificate],
    ) -> SVID:
        """From ``cryptography``'s objects, unchecked (the CA's tools, benchmarks and tests)."""
        return cls(
            spiffe_id,
            PrivateKey.of(key),
            tuple(map(certificate_of, chain)),
            tuple(map(certificate_of, bundle)),
        )


def certificate_of(cert: x509.Certificate) -> Certificate:
    """``cryptography``'s certificate as this module's."""
    from cryptography.hazmat.primitives import serialization

    return Certificate.from_der(cert.public_bytes(serialization.Encoding.DER))


UNREADABLE = "(extensions that cannot be read)"


def root_trust_domains(cert: Certificate) -> set[str]:
    """The trust domains a CA certificate names in SPIFFE URI SANs (X509-SVID 3.2: a signing
    certificate SHOULD carry its trust domain's ID; ours do); empty when it names none.
    ``{UNREADABLE}`` when its extensions cannot be read (a duplicate, a malformed value): such a
    root is never taken as this trust domain's (as "names none" it vouched for our IDs, whatever
    trust domain it was of)."""
    if cert.extension_error is not None:
        return {UNREADABLE}
    domains = set()
    for uri in cert.uris:
        try:
            domains.add(SpiffeId.parse(uri).trust_domain)
        except SpiffeIdError:
            continue
    return domains


def foreign_roots(bundle: Sequence[Certificate], trust_domain: str) -> list[Certificate]:
    """Roots that name other trust domains only: the mesh does not federate, and OpenSSL would
    let any root in the store vouch for any ID, this trust domain's included (the SPIFFE specs
    validate an SVID only against the bundle of its own trust domain)."""
    return [c for c in bundle if (domains := root_trust_domains(c)) and trust_domain not in domains]


def own_roots(bundle: Sequence[Certificate], trust_domain: str) -> tuple[Certificate, ...]:
    """The roots trusted for ``trust_domain``: the bundle without ``foreign_roots`` (a root naming
    no trust domain, such as an operator's own CA, is taken as this one's)."""
    foreign = foreign_roots(bundle, trust_domain)
    own = tuple(c for c in bundle if c not in foreign)
    if not own:
        raise SvidError(
            f"the trust bundle holds no root for trust domain {trust_domain!r} "
            f"(its roots name {sorted(set().union(*map(root_trust_domains, bundle)))})"
        )
    return own


def load_bundle(pem: bytes) -> tuple[Certificate, ...]:
    """The roots of a PEM trust bundle, each read here and loaded by OpenSSL: a root that OpenSSL
    would refuse later (when the TLS contexts are built) is refused now, with the file."""
    try:
        roots = tuple(load_pem_certificates(pem))
    except CertificateError as exc:
        raise SvidError(f"trust bundle is not PEM certificates: {exc}") from exc
    check_with_openssl(roots)
    return roots  # (at least one: load_pem_certificates refuses none)


def check_with_openssl(certs: Sequence[Certificate]) -> None:
    """Loads ``certs`` into a throwaway OpenSSL store (this reader checks no signature and only the
    fields it reads); SvidError when OpenSSL refuses one."""
    store = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for number, cert in enumerate(certs, 1):
        try:
            store.load_verify_locations(cadata=cert.der)
        except ssl.SSLError as exc:
            raise SvidError(
                f"certificate {number} ({cert.subject or 'no subject'}) is refused by OpenSSL: {exc}"
            ) from None
