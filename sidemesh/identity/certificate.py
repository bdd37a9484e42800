"""X.509 certificates as the workload side reads them (no I/O, no cryptography library).

A sidecar reads certificates in three places: its own chain as the CA returns it, the roots of
its trust bundle, and a peer's leaf after OpenSSL has verified the peer's chain. It needs a few
fields of each (serial, validity, subject for logs, the public key's encoding, basicConstraints,
keyUsage, the SAN's URIs and DNS names): read here from the DER (RFC 5280 section 4.1), so that
a sidecar does not load a whole X.509 library for them (``cryptography`` alone was 10 MB of a
56 MB sidecar). Signatures are never checked here: chains are OpenSSL's to verify.

Strict: bytes that are not what RFC 5280 says raise :class:`CertificateError`. Extensions are
parsed with the certificate; one that cannot be read (a duplicate, a malformed value) does not
fail the certificate, it is kept in :attr:`Certificate.extension_error` (a root with such an
extension is not taken as this trust domain's; a leaf with one is refused).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass, field

from sidemesh import der
from sidemesh.der import DERError

_BASIC_CONSTRAINTS = "2.5.29.19"
_KEY_USAGE = "2.5.29.15"
_SUBJECT_ALT_NAME = "2.5.29.17"

# RFC 4514 section 3's short names, and the two more that cryptography's rfc4514_string uses.
_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
_STRING_CODECS = {
    0x0C: "utf-8",
    0x13: "ascii",
    0x16: "ascii",
    0x14: "latin-1",
    0x1E: "utf-16-be",
    0x1C: "utf-32-be",
}

# GeneralName (RFC 5280 4.2.1.6), IMPLICIT tags: otherName [0], x400Address [3], directoryName [4]
# (EXPLICIT) and ediPartyName [5] constructed; the strings, iPAddress and registeredID primitive.
_GENERAL_NAME_TAGS = frozenset((0xA0, 0x81, 0x82, 0xA3, 0xA4, 0xA5, 0x86, 0x87, 0x88))

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)


class CertificateError(ValueError):
    """Bytes that are not an X.509 certificate as RFC 5280 encodes one."""


@dataclass(frozen=True, eq=False, slots=True)
class Certificate:
    """The fields the workload side reads; equal (and hashed) by the DER encoding alone."""

    der: bytes = field(repr=False)
    serial_number: int
    not_valid_before_utc: dt.datetime
    not_valid_after_utc: dt.datetime
    subject: str  # RFC 4514, as cryptography's rfc4514_string writes it
    public_key_info: bytes = field(repr=False)  # the SubjectPublicKeyInfo, exactly as encoded
    is_ca: bool  # basicConstraints cA (False without the extension)
    basic_constraints: bool  # the extension is there
    key_usage: bool  # the extension is there
    digital_signature: bool  # keyUsage bits (False without the extension)
    key_cert_sign: bool
    crl_sign: bool
    has_san: bool
    uris: tuple[str, ...]  # the subjectAltName's uniformResourceIdentifier names, in order
    dns_names: tuple[str, ...]
    extension_error: str | None  # why the extensions cannot be read; None when they can

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Certificate) and other.der == self.der

    def __hash__(self) -> int:
        return hash(self.der)

    @property
    def pem(self) -> bytes:
        body = base64.b64encode(self.der)
        lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
        return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"

    @classmethod
    def from_der(cls, data: bytes) -> Certificate:
        try:
            return _parse(bytes(data))
        except ValueError as exc:  # (DERError, and whatever else bytes can make a conversion raise)
            raise CertificateError(f"not a DER X.509 certificate: {exc}") from None


def load_pem_certificates(pem: bytes) -> list[Certificate]:
    """Every ``CERTIFICATE`` block of ``pem``, in order (other blocks and text between them are
    passed over, as OpenSSL and cryptography do); none is a :class:`CertificateError`."""
    blocks = _PEM_RE.findall(pem)
    if not blocks:
        raise CertificateError("no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    out = []
    for number, body in enumerate(blocks, 1):
        try:
            data = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise CertificateError(f"PEM certificate {number} is not base64") from None
        out.append(Certificate.from_der(data))
    return out


def _parse(data: bytes) -> Certificate:
    outer = der.read(data)
    if outer[0] != der.SEQUENCE or outer[2] != len(data):
        raise DERError("a Certificate is one SEQUENCE")
    parts = der.children(data, outer)
    if [p[0] for p in parts] != [der.SEQUENCE, der.SEQUENCE, der.BIT_STRING]:
        raise DERError("a Certificate is tbsCertificate, signatureAlgorithm, signatureValue")
    fields = der.children(data, parts[0][:3])
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    if len(fields) < 6:
        raise DERError("a TBSCertificate has serialNumber, signature, issuer, validity, subject, key")
    serial, signature, issuer, validity, subject, spki = fields[:6]
    if serial[0] != der.INTEGER or serial[2] == serial[1]:
        raise DERError("serialNumber is not an INTEGER")
    if signature[0] != der.SEQUENCE or issuer[0] != der.SEQUENCE:
        raise DERError("signature or issuer is not a SEQUENCE")
    times = der.children(data, validity[:3]) if validity[0] == der.SEQUENCE else []
    if len(times) != 2:
        raise DERError("validity is not notBefore and notAfter")
    key = der.children(data, spki[:3]) if spki[0] == der.SEQUENCE else []
    if subject[0] != der.SEQUENCE or [k[0] for k in key] != [der.SEQUENCE, der.BIT_STRING]:
        raise DERError("subject or subjectPublicKeyInfo is not a SEQUENCE of what it holds")
    extensions = _Extensions()
    optional = [tag for tag, *_ in fields[6:]]
    # [1] issuerUniqueID, [2] subjectUniqueID (IMPLICIT BIT STRINGs), [3] EXPLICIT Extensions:
    # each at most once, in this order (as OpenSSL reads a certificate)
    if any(tag not in (0x81, 0x82, 0xA3) for tag in optional) or optional != sorted(set(optional)):
        raise DERError(
            f"unexpected fields (tags {', '.join(f'{t:#04x}' for t in optional)}) in a TBSCertificate"
        )
    for tag, start, end, _ in fields[6:]:
        if tag == 0xA3:
            extensions.read(data, start, end)
    return Certificate(
        der=data,
        serial_number=int.from_bytes(data[serial[1] : serial[2]], "big", signed=True),
        not_valid_before_utc=_time(data, times[0]),
        not_valid_after_utc=_time(data, times[1]),
        subject=_rfc4514(data, subject),
        public_key_info=data[spki[3] : spki[2]],
        is_ca=extensions.is_ca,
        basic_constraints=extensions.basic_constraints,
        key_usage=extensions.key_usage,
        digital_signature=extensions.digital_signature,
        key_cert_sign=extensions.key_cert_sign,
        crl_sign=extensions.crl_sign,
        has_san=extensions.has_san,
        uris=tuple(extensions.uris),
        dns_names=tuple(extensions.dns_names),
        extension_error=extensions.error,
    )


def _time(data: bytes, element: tuple[int, int, int, int]) -> dt.datetime:
    """UTCTime (two-digit years: 1950-2049) or GeneralizedTime, in UTC ("Z"), as RFC 5280 4.1.2.5
    has them (GeneralizedTime's fraction of a second, which it forbids, is dropped, not refused)."""
    tag, start, end, _ = element
    text = data[start:end].decode("ascii", "replace")
    try:
        if tag == der.UTC_TIME and len(text) == 13 and text.endswith("Z"):
            year = int(text[:2])
            when = dt.datetime.strptime(f"{year + (2000 if year < 50 else 1900)}{text[2:12]}", "%Y%m%d%H%M%S")
        elif tag == der.GENERALIZED_TIME and len(text) >= 15 and text.endswith("Z"):
            when = dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S")
            if len(text) > 15 and not (text[14] == "." and text[15:-1].isdigit()):
                raise ValueError(text)
        else:
            raise ValueError(text)
    except ValueError:
        raise DERError(f"not an RFC 5280 time: {text!r}") from None
    return when.replace(tzinfo=dt.UTC)


def _rfc4514(data: bytes, name: tuple[int, int, int, int]) -> str:
    """A Name as RFC 4514 writes it: the last RDN first, ``+`` inside a multi-valued one."""
    rdns = []
    for rdn in der.children(data, name[:3]):
        if rdn[0] != der.SET:
            raise DERError("a RelativeDistinguishedName is a SET")
        pairs = []
        for atv in der.children(data, rdn[:3]):
            parts = der.children(data, atv[:3]) if atv[0] == der.SEQUENCE else []
            if len(parts) != 2 or parts[0][0] != der.OID:
                raise DERError("an AttributeTypeAndValue is an OID and a value")
            oid = der.object_identifier(data[parts[0][1] : parts[0][2]])
            tag, start, end, at = parts[1]
            codec = _STRING_CODECS.get(tag)
            try:
                value = _escape(data[start:end].decode(codec)) if codec else None
            except UnicodeDecodeError:
                value = None
            pairs.append(
                f"{_ATTRIBUTE_NAMES.get(oid, oid)}={value if value is not None else '#' + data[at:end].hex()}"
            )
        rdns.append("+".join(pairs))
    return ",".join(reversed(rdns))


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in '"+,;<>\\' else "\\00" if c == "\0" else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


class _Extensions:
    """The extensions the checks read; the first that cannot be read is kept as ``error``."""

    def __init__(self) -> None:
        self.is_ca = self.key_cert_sign = self.crl_sign = self.has_san = False
        self.basic_constraints = self.key_usage = self.digital_signature = False
        self.uris: list[str] = []
        self.dns_names: list[str] = []
        self.error: str | None = None

    def read(self, data: bytes, start: int, end: int) -> None:
        outer = der.read(data, start)
        if outer[0] != der.SEQUENCE or outer[2] != end:
            raise DERError("Extensions is one SEQUENCE")
        seen: set[str] = set()
        for ext in der.children(data, outer):
            parts = der.children(data, ext[:3]) if ext[0] == der.SEQUENCE else []
            if not 2 <= len(parts) <= 3 or parts[0][0] != der.OID or parts[-1][0] != der.OCTET_STRING:
                raise DERError("an Extension is an OID, a critical flag and an OCTET STRING")
            oid = der.object_identifier(data[parts[0][1] : parts[0][2]])
            if oid in seen:
                self.error = self.error or f"extension {oid} appears twice (RFC 5280 4.2)"
                continue
            seen.add(oid)
            value = data[parts[-1][1] : parts[-1][2]]
            try:
                self._value(oid, value)
            except (DERError, UnicodeDecodeError) as exc:
                self.error = self.error or f"extension {oid} cannot be read: {exc}"

    def _value(self, oid: str, value: bytes) -> None:
        if oid == _BASIC_CONSTRAINTS:
            seq = der.read(value)
            fields = der.children(value, seq) if seq[0] == der.SEQUENCE and seq[2] == len(value) else None
            if fields is None:
                raise DERError("basicConstraints is not one SEQUENCE")
            if fields and fields[0][0] == der.BOOLEAN:
                flag = value[fields[0][1] : fields[0][2]]
                if flag not in (b"\x00", b"\xff"):
                    raise DERError("cA is not a DER BOOLEAN")
                self.is_ca = flag == b"\xff"
            self.basic_constraints = True
        elif oid == _KEY_USAGE:
            tag, start, end = der.read(value)
            if tag != der.BIT_STRING or end != len(value) or end - start < 2 or value[start] > 7:
                raise DERError("keyUsage is not a BIT STRING with bits set")
            self.key_usage = True
            self.digital_signature = bool(value[start + 1] & 0x80)  # bit 0
            self.key_cert_sign = bool(value[start + 1] & 0x04)  # bit 5
            self.crl_sign = bool(value[start + 1] & 0x02)  # bit 6
        elif oid == _SUBJECT_ALT_NAME:
            seq = der.read(value)
            if seq[0] != der.SEQUENCE or seq[2] != len(value):
                raise DERError("subjectAltName is not one SEQUENCE")
            names = der.children(value, seq)
            if not names:
                raise DERError("subjectAltName is empty (RFC 5280 4.2.1.6: at least one name)")
            self.has_san = True
            for tag, start, end, _ in names:
                if tag not in _GENERAL_NAME_TAGS:  # (a URI in constructed form, 0xa6, is not DER)
                    raise DERError(f"a GeneralName of tag {tag:#04x} (RFC 5280 4.2.1.6 defines others)")
                if tag == 0x86:  # [6] uniformResourceIdentifier, IA5String
                    self.uris.append(value[start:end].decode("ascii"))
                elif tag == 0x82:  # [2] dNSName, IA5String
                    self.dns_names.append(value[start:end].decode("ascii"))
