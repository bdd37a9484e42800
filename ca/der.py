"""The little DER the CA writes and reads by hand (no I/O).

Enough to assemble a leaf certificate from parts (``ca.leaf``) and to take the raw encodings of a
few fields out of DER that ``cryptography`` has already parsed and accepted. Untrusted input is
never parsed here first: a CSR is read by ``cryptography``; these functions then only locate bytes
inside it, and fail with :class:`DERError` on anything they do not expect.
"""

from __future__ import annotations

import datetime as dt

# The reading side, shared with the workload's certificate reader; re-exported for the CA's modules.
from sidemesh.der import BIT_STRING as BIT_STRING
from sidemesh.der import INTEGER as INTEGER
from sidemesh.der import NULL as NULL
from sidemesh.der import OCTET_STRING as OCTET_STRING
from sidemesh.der import OID as OID
from sidemesh.der import SEQUENCE as SEQUENCE
from sidemesh.der import DERError as DERError
from sidemesh.der import children
from sidemesh.der import read as read

BOOLEAN_TRUE = b"\x01\x01\xff"


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + length(len(content)) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def explicit(number: int, content: bytes) -> bytes:
    """A context-specific constructed tag ``[number]`` around ``content`` (EXPLICIT tagging)."""
    return tlv(0xA0 | number, content)


def integer(value: int) -> bytes:
    if value < 0:
        raise DERError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2:
        raise DERError(f"not an object identifier: {dotted!r}")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return tlv(OID, bytes(out))


def bit_string(data: bytes) -> bytes:
    """A BIT STRING of whole bytes (no unused bits)."""
    return tlv(BIT_STRING, b"\x00" + data)


def time(when: dt.datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, UTC."""
    if when.tzinfo is not dt.UTC:
        when = when.astimezone(dt.UTC)
    clock = f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}{when.second:02d}Z".encode()
    if 1950 <= when.year < 2050:
        return b"\x17\x0d" + b"%02d" % (when.year % 100) + clock  # UTCTime, 13 bytes
    return b"\x18\x0f" + b"%04d" % when.year + clock  # GeneralizedTime, 15 bytes


def certificate_subject(tbs: bytes) -> bytes:
    """The subject Name of a TBSCertificate, exactly as encoded (issuer names must match it)."""
    fields = _fields(tbs)
    if fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    if len(fields) < 6:
        raise DERError("TBSCertificate has too few fields")
    return _encoding(tbs, fields[4])


def csr_public_key_info(csr: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a PKCS#10 request (DER), exactly as encoded."""
    return csr_info_and_key_info(csr)[1]


def csr_info_and_key_info(csr: bytes) -> tuple[bytes, bytes]:
    """The CertificationRequestInfo (what the request's signature covers) and its
    SubjectPublicKeyInfo, of a PKCS#10 request (DER), exactly as encoded."""
    outer = read(csr)
    if outer[0] != SEQUENCE:
        raise DERError("a CSR is a SEQUENCE")
    info = read(csr, outer[1])
    if info[0] != SEQUENCE:
        raise DERError("a CertificationRequestInfo is a SEQUENCE")
    fields = _fields(csr, info)
    if len(fields) < 3 or fields[2][0] != SEQUENCE:
        raise DERError("CertificationRequestInfo has no SubjectPublicKeyInfo")
    return csr[outer[1] : info[2]], _encoding(csr, fields[2])


def _fields(data: bytes, container: tuple[int, int, int] | None = None) -> list[tuple[int, int, int, int]]:
    """(tag, content start, end, element start) of each element inside ``container``."""
    return children(data, container or read(data))


def _encoding(data: bytes, field: tuple[int, int, int, int]) -> bytes:
    return data[field[3] : field[2]]
