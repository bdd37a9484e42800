"""An X.509-SVID held by a workload (no I/O): key, chain, trust bundle, and checks on them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidemesh.spiffe import SpiffeId, SpiffeIdError


class SvidError(ValueError):
    """A certificate that is not a valid SVID for what we expected."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId, dns_names: tuple[str, ...] = ()) -> str:
    """A PKCS#10 request for ``spiffe_id``: one URI SAN (and DNS names only for control-plane
    identities the CA allows them for)."""
    from cryptography.hazmat.primitives import hashes

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


# What reading a certificate's extensions raises when it cannot (malformed, duplicated, a name type
# cryptography does not know, and since cryptography 51 an empty SAN, IAN or certificatePolicies).
EXTENSION_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf X.509-SVID, validated as the X509-SVID standard's leaf validation
    (section 5.2) says: not a CA, no keyCertSign or cRLSign, exactly one URI SAN, a SPIFFE ID with
    a path below the trust domain. The chain itself is the TLS library's to verify."""
    try:
        extensions = cert.extensions
    except EXTENSION_ERRORS as exc:
        raise SvidError(f"certificate extensions cannot be read: {exc}") from exc
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise SvidError("certificate is a CA (basicConstraints CA:true), not a leaf SVID")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if usage.key_cert_sign or usage.crl_sign:
            raise SvidError("a leaf SVID must not have keyCertSign or cRLSign in its key usage")
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SvidError("certificate has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidError(f"an X.509-SVID has exactly one URI SAN, this one has {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(f"URI SAN is not a SPIFFE ID: {exc}") from exc
    if not spiffe_id.path:
        raise SvidError(f"{spiffe_id} names a trust domain, not a workload (a leaf SVID's ID has a path)")
    return spiffe_id


def pem_of(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True, slots=True)
class SVID:
    spiffe_id: SpiffeId
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first
    bundle: tuple[x509.Certificate, ...]  # trusted roots

    @property
    def leaf(self) -> x509.Certificate:
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
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def with_bundle(self, bundle: Sequence[x509.Certificate]) -> SVID:
        return SVID(self.spiffe_id, self.key, self.chain, tuple(bundle))

    @classmethod
    def from_pem(
        cls,
        key: ec.EllipticCurvePrivateKey,
        chain_pem: Sequence[str],
        bundle_pem: Sequence[str],
        expected: SpiffeId,
    ) -> SVID:
        """Check what the CA returned: our key, the identity we asked for, a bundle to trust."""
        try:
            chain = [c for pem in chain_pem for c in x509.load_pem_x509_certificates(pem.encode())]
            bundle = [c for pem in bundle_pem for c in x509.load_pem_x509_certificates(pem.encode())]
        except ValueError as exc:
            raise SvidError(f"CA returned unparsable certificates: {exc}") from exc
        if not chain or not bundle:
            raise SvidError("CA returned an empty certificate chain or trust bundle")
        if chain[0].public_key() != key.public_key():
            raise SvidError("CA returned a certificate for another key")
        got = spiffe_id_of(chain[0])
        if got != expected:
            raise SvidError(f"CA returned a certificate for {got}, expected {expected}")
        return cls(expected, key, tuple(chain), own_roots(bundle, expected.trust_domain))


UNREADABLE = "(extensions that cannot be read)"


def root_trust_domains(cert: x509.Certificate) -> set[str]:
    """The trust domains a CA certificate names in SPIFFE URI SANs (X509-SVID 3.2: a signing
    certificate SHOULD carry its trust domain's ID; ours do); empty when it names none.
    ``{UNREADABLE}`` when its extensions cannot be read (cryptography 51 refuses an empty
    certificatePolicies or issuerAltName that OpenSSL takes): such a root is never taken as this
    trust domain's (as "names none" it vouched for our IDs, whatever trust domain it was of)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    except EXTENSION_ERRORS:
        return {UNREADABLE}
    domains = set()
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            domains.add(SpiffeId.parse(uri).trust_domain)
        except SpiffeIdError:
            continue
    return domains


def foreign_roots(bundle: Sequence[x509.Certificate], trust_domain: str) -> list[x509.Certificate]:
    """Roots that name other trust domains only: the mesh does not federate, and OpenSSL would
    let any root in the store vouch for any ID, this trust domain's included (the SPIFFE specs
    validate an SVID only against the bundle of its own trust domain)."""
    return [c for c in bundle if (domains := root_trust_domains(c)) and trust_domain not in domains]


def own_roots(bundle: Sequence[x509.Certificate], trust_domain: str) -> tuple[x509.Certificate, ...]:
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


def load_bundle(pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        roots = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise SvidError(f"trust bundle is not PEM certificates: {exc}") from exc
    if not roots:
        raise SvidError("trust bundle holds no certificate")
    return roots
