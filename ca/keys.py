"""The CA's own keys and certificates, on disk in the layout of Istio's plug-in CA.

    ca-cert.pem     the signing (intermediate) certificate
    ca-key.pem      its private key (mode 0600)
    cert-chain.pem  the signing certificate and every certificate above it, up to the root
    root-cert.pem   the trust bundle: one or more root certificates (several during a rotation)
    root-key.pem    written by `bootstrap` only; `serve` never reads it

`sidemesh ca bootstrap` writes all five; an operator with their own PKI provides the first four.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca import templates
from ca.errors import KeyMaterialError
from ca.leaf import LeafTemplate, TemplateMismatch
from ca.templates import EXTENSION_ERRORS
from sidemesh.identity.svid import SvidError, certificate_of, own_roots, root_trust_domains

log = logging.getLogger("sidemesh.ca")

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_END_OF_TIME = dt.datetime.max.replace(tzinfo=dt.UTC)
_START_OF_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)

CA_CERT, CA_KEY, CHAIN, ROOTS, ROOT_KEY = (
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
    "root-key.pem",
)


@dataclass(frozen=True, slots=True)
class SigningAuthority:
    cert: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...]  # cert first, then up to (not including) the root
    roots: tuple[x509.Certificate, ...]
    # Derived in __post_init__, once per authority rather than per signing:
    chain_pem: tuple[str, ...] = ()
    bundle_pem: tuple[str, ...] = ()
    not_after_limit: dt.datetime = _END_OF_TIME  # no leaf lives past it
    not_before_limit: dt.datetime = _START_OF_TIME  # no leaf is valid before it
    leaf_template: LeafTemplate | None = None  # None: sign with the reference builder (see template_error)
    template_error: str | None = None

    def __post_init__(self) -> None:
        encode = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
        object.__setattr__(self, "chain_pem", tuple(map(encode, self.chain)))
        object.__setattr__(self, "bundle_pem", tuple(map(encode, self.roots)))
        # The root the chain ends at counts too: an operator's intermediate may outlive its root.
        top = self.chain[-1] if self.chain else self.cert
        issuing_roots = [r for r in self.roots if r == top or _issued_by(top, r)]
        ends = [c.not_valid_after_utc for c in (self.cert, *self.chain)]
        if issuing_roots:
            ends.append(max(r.not_valid_after_utc for r in issuing_roots))
        object.__setattr__(self, "not_after_limit", min(ends))
        object.__setattr__(
            self, "not_before_limit", max(c.not_valid_before_utc for c in (self.cert, *self.chain))
        )
        try:
            template = LeafTemplate.for_issuer(self.cert, self.key, self.chain)
        except (TemplateMismatch, ValueError, TypeError) as exc:
            object.__setattr__(self, "template_error", str(exc))
        else:
            object.__setattr__(self, "leaf_template", template)


def key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _is_self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def assemble(
    cert: x509.Certificate, key: SigningKey, chain: list[x509.Certificate], roots: list[x509.Certificate]
) -> SigningAuthority:
    """Check that the pieces fit: key matches, signing cert is a CA, chain links up to a root."""
    if not roots:
        raise KeyMaterialError("the trust bundle holds no root certificate")
    for root in roots:  # (published to workloads and federation peers as trust anchors)
        if not certificate_of(root).is_ca:
            raise KeyMaterialError(
                f"the trust bundle holds {root.subject.rfc4514_string() or 'a certificate'!r}, which is "
                "not a CA (basicConstraints CA:true): a bundle holds CA certificates only (X509-SVID 6.1)"
            )
    if cert.public_key() != key.public_key():
        raise KeyMaterialError("the signing key does not match the signing certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise KeyMaterialError("the signing certificate is not a CA (basicConstraints CA:true)")
    links = [c for c in chain if not _is_self_signed(c)] or [cert]
    if links[0] != cert:
        links.insert(0, cert)
    for ca_cert in links:  # (verifiers would refuse every leaf it signs)
        _check_signing_extensions(
            ca_cert, "the signing certificate" if ca_cert == cert else "an intermediate"
        )
    for child, parent in zip(links, [*links[1:], None], strict=True):
        issuers = [parent] if parent is not None else list(roots)
        if not any(_issued_by(child, p) for p in issuers):
            raise KeyMaterialError(
                f"certificate {child.subject.rfc4514_string()!r} does not chain to the trust bundle"
            )
    return SigningAuthority(cert, key, tuple(links), tuple(roots))


def _check_signing_extensions(cert: x509.Certificate, what: str) -> None:
    """X509-SVID 4.3: a signing certificate MUST set keyUsage (critical) with keyCertSign (py-spiffe,
    go-spiffe and rust-spiffe refuse a chain without): refused. RFC 5280 4.2.1.2: a CA certificate
    MUST carry a subjectKeyIdentifier (`openssl verify -x509_strict` refuses one without), but
    default verifiers (OpenSSL's, Go's, the sidecars') take it and Istio's sample CA had none:
    a warning."""
    name = cert.subject.rfc4514_string()
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise KeyMaterialError(
            f"{what} ({name}) has no keyUsage: SPIFFE verifiers refuse the SVIDs it vouches for "
            "(X509-SVID 4.3: keyUsage with keyCertSign); reissue it with keyUsage keyCertSign, cRLSign"
        ) from None
    if not usage.key_cert_sign:
        raise KeyMaterialError(f"{what}'s ({name}) key usage lacks keyCertSign (RFC 5280 4.2.1.3)")
    if not cert.extensions.get_extension_for_class(x509.KeyUsage).critical:
        log.warning(
            "a signing certificate's keyUsage is not marked critical (X509-SVID 4.3 asks it): strict "
            "SPIFFE verifiers may refuse its SVIDs; reissue it with a critical keyUsage",
            extra={"certificate": what, "subject": name},
        )
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        log.warning(
            "a signing certificate has no subjectKeyIdentifier (RFC 5280 4.2.1.2): strict verifiers "
            "(openssl verify -x509_strict) refuse its chains; reissue it with one",
            extra={"certificate": what, "subject": name},
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read(directory: Path, name: str) -> bytes:
    try:
        return (directory / name).read_bytes()
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot read {directory / name}: {exc.strerror}; run `sidemesh ca bootstrap --dir {directory}`"
        ) from exc


def _extensions_readable(cert: x509.Certificate, what: str) -> None:
    try:
        cert.extensions  # noqa: B018 (parsed on access)
    except EXTENSION_ERRORS as exc:
        raise KeyMaterialError(
            f"the {what} {cert.subject.rfc4514_string()!r} has extensions that cannot be read: {exc}"
        ) from exc


def load(directory: Path) -> SigningAuthority:
    try:
        cert = x509.load_pem_x509_certificate(_read(directory, CA_CERT))
        key = serialization.load_pem_private_key(_read(directory, CA_KEY), password=None)
        chain_path = directory / CHAIN
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes()) if chain_path.exists() else [cert]
        roots = x509.load_pem_x509_certificates(_read(directory, ROOTS))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: an encrypted key
        raise KeyMaterialError(
            f"unusable CA material in {directory}: {exc} (PEM certificates and an unencrypted PEM key)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyMaterialError(f"{directory / CA_KEY}: only EC and RSA signing keys are supported")
    # (the CA's own, or an operator's; a raw ValueError stopped `ca serve` with a traceback)
    _extensions_readable(cert, "signing certificate")
    for c in chain:
        _extensions_readable(c, "chain certificate")
    for c in roots:
        _extensions_readable(c, "root")
    return assemble(cert, key, chain, roots)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with ``mode``, also when the file exists (os.open's mode applies
    only to a file it creates: a key written over a 0644 file stayed readable by everyone). In
    place, through symlinks and bind mounts, keeping the file's owner; not truncated before the
    write (a failure emptied a token file), but cut to its new length after it. A file we may not
    chmod (another user's) is written only if nobody else can read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
    try:
        try:
            os.fchmod(fd, mode)
        except PermissionError:
            if os.fstat(fd).st_mode & 0o077 & ~mode:
                raise PermissionError(
                    errno.EPERM,
                    f"{oct(os.fstat(fd).st_mode & 0o777)} is wider than {oct(mode)} and not ours to chmod",
                ) from None
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def check_trust_domain(authority: SigningAuthority, trust_domain: str) -> None:
    """Material for another trust domain signs nothing ours: the signing certificate (X509-SVID
    3.2: it SHOULD carry its trust domain's ID; ours do) and the roots must not name only others.
    (Served, every workload would refuse the SVIDs: an error here rather than on each of them.)"""
    signing = certificate_of(authority.cert)
    named = root_trust_domains(signing)
    if len(named) > 1:  # (X509-SVID 3.2: a signing certificate names its own trust domain, if any)
        raise KeyMaterialError(
            f"the signing certificate names trust domains {', '.join(sorted(named))}: a signing "
            "certificate carries at most its own trust domain's ID (X509-SVID 3.2)"
        )
    with_path = [u for u in signing.uris if u.startswith("spiffe://") and "/" in u[len("spiffe://") :]]
    if with_path:
        raise KeyMaterialError(
            f"the signing certificate carries {with_path[0]}, a SPIFFE ID with a path: a signing "
            "certificate's ID MUST NOT have one (X509-SVID 3.2); reissue it with spiffe://"
            f"{trust_domain} or no URI"
        )
    if named and trust_domain not in named:
        raise KeyMaterialError(
            f"the signing certificate is for trust domain {', '.join(sorted(named))}, not {trust_domain}: "
            "give --trust-domain the CA's trust domain, or bootstrap material for this one"
        )
    read = {certificate_of(root): root for root in authority.roots}
    try:
        own = [read[root] for root in own_roots(list(read), trust_domain)]
    except SvidError as exc:
        raise KeyMaterialError(f"{exc}: give --trust-domain the CA's trust domain") from exc
    top = authority.chain[-1] if authority.chain else authority.cert
    if not any(top == root or _issued_by(top, root) for root in own):
        raise KeyMaterialError(
            f"the signing chain ends at a root of another trust domain, not one of {trust_domain}'s: "
            "workloads trust only their own trust domain's roots and would refuse every SVID; "
            "put the root that issued the chain in root-cert.pem (with this trust domain's ID)"
        )


def bootstrap(
    directory: Path,
    trust_domain: str,
    now: dt.datetime,
    root_lifetime: dt.timedelta = dt.timedelta(days=3650),
    intermediate_lifetime: dt.timedelta = dt.timedelta(days=365),
    force: bool = False,
) -> SigningAuthority:
    """Create a root and an intermediate in ``directory`` (refuses to overwrite without ``force``)."""
    if (directory / CA_KEY).exists() and not force:
        raise KeyMaterialError(
            f"{directory} already holds a CA; pass --force to replace it (existing workloads will stop trusting new certificates)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, trust_domain, now, root_lifetime)
    inter_key = templates.new_key()
    inter = templates.intermediate_certificate(
        inter_key.public_key(), trust_domain, root, root_key, now, intermediate_lifetime
    )
    write_file(directory / ROOT_KEY, key_pem(root_key), 0o600)
    write_file(directory / CA_KEY, key_pem(inter_key), 0o600)
    write_file(directory / ROOTS, cert_pem(root), 0o644)
    write_file(directory / CA_CERT, cert_pem(inter), 0o644)
    write_file(directory / CHAIN, cert_pem(inter, root), 0o644)
    return assemble(inter, inter_key, [inter, root], [root])
