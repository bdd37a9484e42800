"""Leaf certificates from a per-issuer DER template (no I/O).

Everything in an X.509-SVID but its serial number, validity, public key and SANs is the same for
every leaf one issuer signs: version, signature algorithm, issuer name, the empty subject,
basicConstraints, keyUsage, extKeyUsage and the authority key identifier. :class:`LeafTemplate`
encodes those once; a signing encodes the four parts that change, signs the TBSCertificate with the
issuer's key and wraps it. That is about a third of the cost of ``cryptography``'s
``CertificateBuilder`` for the same bytes.

``templates.leaf_builder`` stays the reference: :meth:`LeafTemplate.for_issuer` builds a probe
leaf both ways and refuses to exist unless the two TBSCertificates are byte-for-byte equal, so the
template can never issue something the reference would not.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca import der, templates
from sidemesh.spiffe import SpiffeId

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CRITICAL = der.BOOLEAN_TRUE
_VERSION_3 = der.explicit(0, der.integer(2))
_EMPTY_NAME = der.sequence()
_ECDSA_SHA256 = der.sequence(der.oid("1.2.840.10045.4.3.2"))
_RSA_SHA256 = der.sequence(der.oid("1.2.840.113549.1.1.11"), der.tlv(der.NULL, b""))
_SAN = der.oid("2.5.29.17")
_SKI = der.oid("2.5.29.14")
_URI, _DNS = 0x86, 0x82  # GeneralName [6] uniformResourceIdentifier, [2] dNSName (IMPLICIT IA5String)


def _extension(oid: bytes, value: bytes, critical: bool) -> bytes:
    return der.sequence(oid, _CRITICAL if critical else b"", der.tlv(der.OCTET_STRING, value))


# The SVID profile's fixed extensions, in the reference builder's order (then SAN, SKI, AKI).
_FIXED_EXTENSIONS = b"".join(
    (
        _extension(der.oid("2.5.29.19"), der.sequence(), critical=True),  # basicConstraints CA:false
        _extension(der.oid("2.5.29.15"), der.tlv(der.BIT_STRING, b"\x07\x80"), critical=True),  # dS
        _extension(
            der.oid("2.5.29.37"),
            der.sequence(der.oid("1.3.6.1.5.5.7.3.1"), der.oid("1.3.6.1.5.5.7.3.2")),  # server, client
            critical=False,
        ),
    )
)


# The subjectKeyIdentifier extension up to its 20-byte key identifier.
_SKI_HEAD = _extension(_SKI, der.tlv(der.OCTET_STRING, bytes(20)), critical=False)[:-20]
# SubjectPublicKeyInfo of an ECDSA P-256 key, up to its uncompressed point (04 || X || Y).
_P256_KEY_INFO = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")


class TemplateMismatch(Exception):
    """The template's probe leaf differs from the reference builder's (the reason says where)."""


def pem(certificate_der: bytes) -> str:
    """PEM with 64-character lines, as ``cryptography`` writes it."""
    body = b"".join(
        binascii.b2a_base64(certificate_der[i : i + 48]) for i in range(0, len(certificate_der), 48)
    )
    return "-----BEGIN CERTIFICATE-----\n" + body.decode() + "-----END CERTIFICATE-----\n"


def subject_key_id(public_key_info: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1, as ``cryptography`` computes it: SHA-1 of the key's bits."""
    if len(public_key_info) == 91 and public_key_info.startswith(_P256_KEY_INFO):
        return hashlib.sha1(public_key_info[26:]).digest()  # the uncompressed point
    _tag, start, end = der.read(public_key_info)
    _alg_tag, _alg_start, alg_end = der.read(public_key_info, start)
    tag, bits_start, bits_end = der.read(public_key_info, alg_end)
    if tag != der.BIT_STRING or bits_end != end or public_key_info[bits_start] != 0:
        raise der.DERError("SubjectPublicKeyInfo without a whole-byte BIT STRING key")
    return hashlib.sha1(public_key_info[bits_start + 1 : bits_end]).digest()


def san_value(spiffe_id: SpiffeId, dns_names: Sequence[str] = ()) -> bytes:
    names = der.tlv(_URI, str(spiffe_id).encode("ascii"))
    for name in dns_names:
        names += der.tlv(_DNS, name.encode("ascii"))
    return der.tlv(der.SEQUENCE, names)


@dataclass(frozen=True, slots=True)
class LeafTemplate:
    head: bytes  # version, then (after the serial) signature algorithm and issuer name
    algorithm: bytes  # signatureAlgorithm, DER
    issuer_name: bytes  # the issuer's subject, exactly as encoded in its certificate
    authority_key_id: bytes  # the AKI extension, DER
    sign_tbs: Callable[[bytes], bytes]

    @classmethod
    def for_issuer(
        cls, issuer: x509.Certificate, key: SigningKey, chain: Sequence[x509.Certificate]
    ) -> LeafTemplate:
        """The template of ``issuer``'s leaves, checked against the reference builder."""
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = _ECDSA_SHA256
            ecdsa = ec.ECDSA(hashes.SHA256())
            sign_tbs: Callable[[bytes], bytes] = lambda tbs: key.sign(tbs, ecdsa)  # noqa: E731
        else:
            algorithm = _RSA_SHA256
            pkcs1 = padding.PKCS1v15()
            sha256 = hashes.SHA256()
            sign_tbs = lambda tbs: key.sign(tbs, pkcs1, sha256)  # noqa: E731
        aki = templates.authority_key_id(issuer)
        assert aki.key_identifier is not None
        template = cls(
            head=_VERSION_3,
            algorithm=algorithm,
            issuer_name=der.certificate_subject(issuer.tbs_certificate_bytes),
            authority_key_id=_extension(
                der.oid("2.5.29.35"), der.sequence(der.tlv(0x80, aki.key_identifier)), critical=False
            ),
            sign_tbs=sign_tbs,
        )
        template._check_against_reference(issuer, key, chain)
        return template

    def tbs(
        self,
        serial: int,
        not_before: dt.datetime,
        not_after: dt.datetime,
        public_key_info: bytes,
        san: bytes,
    ) -> bytes:
        extensions = b"".join(
            (
                _FIXED_EXTENSIONS,
                _extension(_SAN, san, critical=True),
                _SKI_HEAD,
                subject_key_id(public_key_info),
                self.authority_key_id,
            )
        )
        return der.sequence(
            self.head,
            der.integer(serial),
            self.algorithm,
            self.issuer_name,
            der.sequence(der.time(not_before), der.time(not_after)),
            _EMPTY_NAME,
            public_key_info,
            der.explicit(3, der.sequence(extensions)),
        )

    def certificate(self, tbs: bytes) -> bytes:
        """Sign ``tbs`` with the issuer's key: the DER certificate."""
        return der.sequence(tbs, self.algorithm, der.bit_string(self.sign_tbs(tbs)))

    def _check_against_reference(
        self, issuer: x509.Certificate, key: SigningKey, chain: Sequence[x509.Certificate]
    ) -> None:
        probe_key = templates.new_key().public_key()
        spiffe_id = SpiffeId.parse("spiffe://template.check/ns/probe/sa/probe")
        # The issuer's own notBefore: inside its validity, whatever the clock says.
        now = issuer.not_valid_before_utc + templates.BACKDATE
        params = templates.LeafParams(spiffe_id, probe_key, dt.timedelta(minutes=5), now, ("probe.check",))
        serial = x509.random_serial_number()
        reference = templates.leaf_builder(params, issuer, chain, serial=serial).sign(key, hashes.SHA256())
        spki = probe_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ours = self.tbs(
            serial,
            reference.not_valid_before_utc,
            reference.not_valid_after_utc,
            spki,
            san_value(spiffe_id, params.dns_names),
        )
        if ours != reference.tbs_certificate_bytes:
            raise TemplateMismatch(
                f"the DER template's TBSCertificate differs from the reference builder's "
                f"({len(ours)} vs {len(reference.tbs_certificate_bytes)} bytes)"
            )
