"""The signing authority: its limits (no leaf outlives any certificate its chain ends at, none is
valid before it), what it refuses to load, and the AKI of what it signs."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import issuer, keys, templates
from ca.errors import KeyMaterialError, SigningUnavailable
from sidemesh.identity.svid import make_csr
from sidemesh.spiffe import SpiffeId
from tests.support import pki

CART = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")

NOW = dt.datetime(2026, 12, 5, 6, 0, tzinfo=dt.UTC)


def _outliving_intermediate() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A root of one day and an intermediate under it issued for 30 (root, intermediate, its key)."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=1))
    inter_key = templates.new_key()
    clamped = templates.intermediate_certificate(
        inter_key.public_key(), "cluster.local", root, root_key, NOW, dt.timedelta(days=1)
    )
    return root, pki.reissued(clamped, root_key, NOW, NOW + dt.timedelta(days=30)), inter_key


def test_a_leaf_may_not_outlive_the_root_an_intermediate_chains_to() -> None:
    """An operator's own PKI: the intermediate was issued for longer than its root lives (the CA's
    own bootstrap never does that). Leaves end with the root, not with the intermediate."""
    root, inter, inter_key = _outliving_intermediate()
    assert inter.not_valid_after_utc > root.not_valid_after_utc

    authority = keys.assemble(inter, inter_key, [inter, root], [root])
    assert authority.not_after_limit == root.not_valid_after_utc

    # A root that did not issue the chain (a newer one, kept in the bundle for rotation) does not count.
    other_key = templates.new_key()
    other = templates.root_certificate(other_key, "cluster.local", NOW, dt.timedelta(hours=1))
    authority = keys.assemble(inter, inter_key, [inter, root], [root, other])
    assert authority.not_after_limit == root.not_valid_after_utc


@pytest.mark.parametrize("template", [True, False], ids=["template", "reference-builder"])
def test_an_issued_leaf_ends_with_the_root_on_either_signing_path(template: bool) -> None:
    """The reference builder (used when the DER template cannot reproduce an issuer) capped a leaf
    at its chain only: with an intermediate that outlives its root the leaf outlived the root,
    and the notAfter the CA reported (and audited) was not the certificate's."""
    root, inter, inter_key = _outliving_intermediate()
    authority = keys.assemble(inter, inter_key, [inter, root], [root])
    if not template:
        object.__setattr__(authority, "leaf_template", None)
    now = root.not_valid_after_utc - dt.timedelta(minutes=30)
    issued = issuer.issue(authority, CART, make_csr(templates.new_key(), CART), dt.timedelta(hours=1), now)
    ends = issued.certificate.not_valid_after_utc
    assert ends == root.not_valid_after_utc.replace(microsecond=0) == issued.not_after


def test_signing_certificates_have_no_leaf_key_usage() -> None:
    """X509-SVID appendix A: digitalSignature if and only if the certificate is a leaf."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=10))
    inter = templates.intermediate_certificate(
        templates.new_key().public_key(), "cluster.local", root, root_key, NOW, dt.timedelta(days=1)
    )
    for cert in (root, inter):
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
        # X509-SVID 3.2: a signing certificate SHOULD be an SVID, of the trust domain (no path).
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]


def _operator_intermediate(
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    ski: bytes | None = None,
    key_cert_sign: bool = True,
    *,
    key_usage: bool = True,
    with_ski: bool = True,
    trust_domain: str | None = None,
    uris: tuple[str, ...] = (),
    key_usage_critical: bool = True,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """An intermediate as an operator's own PKI may make it: its SKI derived otherwise than by
    SHA-1 (RFC 7093), a key usage without keyCertSign, no key usage or no SKI at all."""
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "operator intermediate")]))
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(templates.authority_key_id(root), critical=False)
    )
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, key_cert_sign, True, False, False),
            critical=key_usage_critical,
        )
    if with_ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier(ski) if ski else x509.SubjectKeyIdentifier.from_public_key(public),
            critical=False,
        )
    if trust_domain or uris:
        names = [f"spiffe://{trust_domain}"] if trust_domain else []
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in (*names, *uris)])
        builder = builder.add_extension(san, critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(root_key, hashes.SHA256())


def test_a_leafs_authority_key_id_is_its_issuers_subject_key_id(tmp_path: Path) -> None:
    """RFC 5280 4.2.1.1: OpenSSL and BoringSSL look the issuer up by the AKI. It was the SHA-1 of
    the issuer's key whatever the issuer's SKI said: with an operator's intermediate whose SKI is
    RFC 7093's truncated SHA-256, `openssl verify` (and so Envoy and our sidecars) refused every
    leaf; cryptography's verifier did not mind."""
    now = dt.datetime.now(dt.UTC)
    root_key = templates.new_key()
    root = templates.root_certificate(
        root_key, "cluster.local", now - dt.timedelta(hours=1), dt.timedelta(days=30)
    )
    key = templates.new_key()
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    ski = hashlib.sha256(point).digest()[:20]
    inter = _operator_intermediate(root, root_key, key, now - dt.timedelta(hours=1), ski=ski)
    authority = keys.assemble(inter, key, [inter, root], [root])
    assert authority.leaf_template is not None  # (the reference builder agrees byte for byte)
    issued = issuer.issue(authority, CART, make_csr(templates.new_key(), CART), dt.timedelta(hours=1), now)
    aki = issued.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski
    roots = keys.cert_pem(root).decode()
    assert pki.openssl_verify(tmp_path, issued.chain_pem[0], "".join(issued.chain_pem[1:]), roots) is None


def test_a_signing_certificate_without_key_cert_sign_is_refused() -> None:
    """Verifiers refuse every leaf such a certificate signs (RFC 5280 4.2.1.3): refused at load."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=30))
    key = templates.new_key()
    inter = _operator_intermediate(root, root_key, key, NOW, key_cert_sign=False)
    with pytest.raises(KeyMaterialError, match="keyCertSign"):
        keys.assemble(inter, key, [inter, root], [root])


def test_a_signing_certificate_without_key_usage_is_refused(tmp_path: Path) -> None:
    """X509-SVID 4.3 (keyUsage with keyCertSign on every signing certificate): such an intermediate
    was accepted, and what it signed was refused by SPIFFE libraries (py-spiffe, go-spiffe)."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=30))
    key = templates.new_key()
    inter = _operator_intermediate(root, root_key, key, NOW, key_usage=False)
    with pytest.raises(KeyMaterialError, match=r"the signing certificate .*no keyUsage"):
        keys.assemble(inter, key, [inter, root], [root])
    # ... as the signing certificate, and as an intermediate above it
    leaf_key = templates.new_key()
    below = _operator_intermediate(inter, key, leaf_key, NOW)
    with pytest.raises(KeyMaterialError, match=r"an intermediate .*no keyUsage"):
        keys.assemble(below, leaf_key, [below, inter, root], [root])
    # the same chain with both extensions is taken, and strict verifiers take what it issues
    good = _operator_intermediate(root, root_key, key, NOW)
    authority = keys.assemble(good, key, [good, root], [root])
    now = NOW + dt.timedelta(hours=1)
    issued = issuer.issue(authority, CART, make_csr(templates.new_key(), CART), dt.timedelta(hours=1), now)
    assert issued.certificate is not None


def test_a_signing_certificate_without_a_key_identifier_loads_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 5280 4.2.1.2 asks a CA for a subjectKeyIdentifier and strict verifiers refuse one
    without, but default ones (OpenSSL's, Go's, the sidecars') take it, and Istio's sample CA had
    none: refusing it stopped `ca serve` on material that worked. A warning says what to fix."""
    root_key = templates.new_key()
    root = templates.root_certificate(root_key, "cluster.local", NOW, dt.timedelta(days=30))
    key = templates.new_key()
    inter = _operator_intermediate(root, root_key, key, NOW, with_ski=False)
    keys.assemble(inter, key, [inter, root], [root])
    assert any("no subjectKeyIdentifier" in r.getMessage() for r in caplog.records)


def test_a_signing_chain_ending_at_another_trust_domains_root_is_refused() -> None:
    """root-cert.pem with our root and another trust domain's, and an intermediate for ours issued
    by the other one: loaded, and every workload (which keeps only its trust domain's roots)
    refused every SVID and the CA's own serving certificate."""
    our_key, other_key = templates.new_key(), templates.new_key()
    ours = templates.root_certificate(our_key, "cluster.local", NOW, dt.timedelta(days=30))
    other = templates.root_certificate(other_key, "other.org", NOW, dt.timedelta(days=30))
    key = templates.new_key()
    inter = _operator_intermediate(other, other_key, key, NOW, trust_domain="cluster.local")
    authority = keys.assemble(inter, key, [inter, other], [ours, other])
    with pytest.raises(KeyMaterialError, match="ends at a root of another trust domain"):
        keys.check_trust_domain(authority, "cluster.local")
    mine = _operator_intermediate(ours, our_key, key, NOW, trust_domain="cluster.local")
    keys.check_trust_domain(keys.assemble(mine, key, [mine, ours], [ours, other]), "cluster.local")


def test_nothing_is_issued_before_the_signing_chain_is_valid() -> None:
    """An intermediate staged early, or made on a clock running well ahead: its leaves would not be
    valid for a while, and with a skew above their lifetime their notAfter came before their
    notBefore. A chain that starts a few seconds ahead (no backdating, as cert-manager makes them)
    still signs, its leaves starting with it."""
    root_key = templates.new_key()
    root = templates.root_certificate(
        root_key, "cluster.local", NOW - dt.timedelta(days=1), dt.timedelta(days=30)
    )
    key = templates.new_key()
    csr = make_csr(templates.new_key(), CART)

    def authority(ahead: dt.timedelta) -> keys.SigningAuthority:
        inter = _operator_intermediate(root, root_key, key, (NOW + ahead).replace(microsecond=0))
        return keys.assemble(inter, key, [inter, root], [root])

    later = authority(dt.timedelta(minutes=11))
    assert later.not_before_limit == later.cert.not_valid_before_utc
    with pytest.raises(SigningUnavailable) as refused:
        issuer.issue(later, CART, csr, dt.timedelta(hours=1), NOW)
    assert "not valid before" in refused.value.detail
    taken = issuer.issue(later, CART, csr, dt.timedelta(hours=1), NOW + dt.timedelta(minutes=12))
    assert taken.certificate.not_valid_before_utc < taken.certificate.not_valid_after_utc

    soon = authority(dt.timedelta(seconds=4))
    leaf = issuer.issue(soon, CART, csr, dt.timedelta(hours=1), NOW).certificate
    assert leaf.not_valid_before_utc == soon.cert.not_valid_before_utc < leaf.not_valid_after_utc
    with pytest.raises(SigningUnavailable) as never:  # starts 4 min ahead, would end in 2
        issuer.issue(authority(dt.timedelta(minutes=4)), CART, csr, dt.timedelta(minutes=2), NOW)
    assert "never be valid" in never.value.detail


def test_an_encrypted_signing_key_is_unusable_material(tmp_path: Path) -> None:
    """cryptography raises TypeError for it (not ValueError): it escaped, killing the CA's watch of
    its directory for good (no reload after the key was put right) or its start with a traceback."""
    keys.bootstrap(tmp_path, "cluster.local", NOW)
    key = serialization.load_pem_private_key((tmp_path / keys.CA_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / keys.CA_KEY).write_bytes(encrypted)
    with pytest.raises(KeyMaterialError, match="unencrypted PEM key"):
        keys.load(tmp_path)


def test_ca_material_whose_extensions_cannot_be_read_is_refused_clearly(tmp_path: Path) -> None:
    """An operator's intermediate with an empty certificatePolicies (OpenSSL takes it, cryptography
    51 refuses to read the extensions): a raw ValueError stopped `ca serve` with a traceback, and a
    reload logged only that checking the material failed."""
    from cryptography.x509.oid import ExtensionOID

    authority = keys.bootstrap(tmp_path, "cluster.local", NOW)
    root_key = serialization.load_pem_private_key((tmp_path / keys.ROOT_KEY).read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    inter = authority.cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(inter.subject)
        .issuer_name(inter.issuer)
        .public_key(inter.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(inter.not_valid_before_utc)
        .not_valid_after(inter.not_valid_after_utc)
    )
    for ext in inter.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    empty = x509.UnrecognizedExtension(ExtensionOID.CERTIFICATE_POLICIES, b"\x30\x00")
    odd = builder.add_extension(empty, critical=False).sign(root_key, hashes.SHA256())
    (tmp_path / keys.CA_CERT).write_bytes(keys.cert_pem(odd))
    (tmp_path / keys.CHAIN).write_bytes(keys.cert_pem(odd, authority.roots[0]))
    with pytest.raises(KeyMaterialError, match=r"signing certificate .* extensions that cannot be read"):
        keys.load(tmp_path)


def _root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_key = templates.new_key()
    return templates.root_certificate(root_key, "cluster.local", _SINCE, dt.timedelta(days=30)), root_key


# The test handshakes check validity at the real time (OpenSSL's clock), not at NOW.
_SINCE = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("bend", "says"),
    [
        ({"uris": ("spiffe://cluster.local/ns/shop/sa/cart",)}, "a SPIFFE ID with a path"),
        ({"trust_domain": "cluster.local", "uris": ("spiffe://other.org",)}, "names trust domains"),
    ],
    ids=["id-with-a-path", "two-trust-domains"],
)
def test_a_signing_certificate_naming_a_workload_or_two_trust_domains_is_refused(
    bend: dict[str, Any], says: str
) -> None:
    """X509-SVID 3.2: a signing certificate carries at most its trust domain's ID, without a path."""
    root, root_key = _root()
    key = templates.new_key()
    inter = _operator_intermediate(root, root_key, key, _SINCE, **bend)
    with pytest.raises(KeyMaterialError, match=says):
        keys.check_trust_domain(keys.assemble(inter, key, [inter, root], [root]), "cluster.local")


@pytest.mark.parametrize(
    ("extension", "says"),
    [
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), "as a TLS client"),
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), "as a TLS server"),
        (
            x509.NameConstraints([x509.UniformResourceIdentifier("other.org")], None),
            "permitted subtree violation",
        ),
    ],
    ids=["eku-server-only", "eku-client-only", "name-constraints"],
)
def test_material_whose_svids_every_peer_would_refuse_is_refused_by_a_test_handshake(
    extension: x509.ExtensionType, says: str
) -> None:
    """Loaded and trusted, and yet every SVID it signed failed OpenSSL's check in every sidecar: an
    intermediate for server use only (every inbound connection refused), name constraints that
    leave the trust domain out. A TLS handshake between two SVIDs it signs finds it at load."""
    root, root_key = _root()
    key = templates.new_key()
    now = dt.datetime.now(dt.UTC)
    good = keys.assemble(
        *(lambda i: (i, key, [i, root], [root]))(_operator_intermediate(root, root_key, key, _SINCE))
    )
    issuer.probe(good, "cluster.local", now)
    inter = _operator_intermediate(root, root_key, key, _SINCE, extensions=(extension,))
    bad = keys.assemble(inter, key, [inter, root], [root])
    keys.check_trust_domain(bad, "cluster.local")  # (what the loading checks see: nothing wrong)
    with pytest.raises(KeyMaterialError, match=says):
        issuer.probe(bad, "cluster.local", now)


def test_a_signing_key_usage_that_is_not_critical_loads_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, root_key = _root()
    key = templates.new_key()
    inter = _operator_intermediate(root, root_key, key, _SINCE, key_usage_critical=False)
    keys.assemble(inter, key, [inter, root], [root])
    assert any("keyUsage is not marked critical" in r.getMessage() for r in caplog.records)


def test_a_trust_domain_longer_than_an_ou_may_be_is_left_out_of_the_ca_name() -> None:
    """RFC 5280's upper bound for an organizationalUnitName is 64 characters; a trust domain may
    have 255: the name carried a 164-byte OU."""
    long_domain = ".".join(["a" * 40] * 4)  # 163 characters
    key = templates.new_key()
    for domain, unit in ((long_domain, []), ("cluster.local", ["cluster.local"])):
        root = templates.root_certificate(key, domain, NOW, dt.timedelta(days=1))
        assert [
            a.value for a in root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
        ] == unit
        uris = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{domain}"]
