"""Reading DER (no I/O): the element at a position, and the elements inside one.

Shared by the CA (``ca.der``, which also writes DER) and the workload side's certificate reader
(``sidemesh.identity.certificate``). Definite lengths of at most four bytes and one-byte tags
only, as X.509 certificates and PKCS#10 requests use them; anything else is a :class:`DERError`.
"""

from __future__ import annotations

SEQUENCE = 0x30
SET = 0x31
BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18


class DERError(ValueError):
    """Bytes that are not the DER this module expects."""


def read(data: bytes, pos: int = 0) -> tuple[int, int, int]:
    """The element at ``pos``: (tag, start of its content, end of the element)."""
    if pos + 2 > len(data):
        raise DERError("truncated element")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DERError("multi-byte tags are not expected here")
    start = pos + 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise DERError("bad length")
        size = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + size
    if end > len(data):
        raise DERError("element runs past the end of its container")
    return tag, start, end


def children(data: bytes, container: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """(tag, content start, end, element start) of each element inside ``container`` (as
    :func:`read` returns it); an element running past the container's end is a :class:`DERError`."""
    out = []
    pos, stop = container[1], container[2]
    while pos < stop:
        tag, start, end = read(data, pos)
        if end > stop:
            raise DERError("element runs past the end of its container")
        out.append((tag, start, end, pos))
        pos = end
    return out


MAX_ARC_BYTES = 20  # 140 bits: a UUID arc (2.25.<128 bits>, X.667) takes 19


def object_identifier(content: bytes) -> str:
    """The dotted form of an OBJECT IDENTIFIER's content octets."""
    if not content or content[-1] & 0x80:
        raise DERError("truncated object identifier")
    arcs: list[int] = []
    value = 0
    size = 0
    for i, byte in enumerate(content):
        if value == 0 and byte == 0x80 and (i == 0 or not content[i - 1] & 0x80):
            raise DERError("object identifier arc with a leading zero byte")
        size += 1
        if size > MAX_ARC_BYTES:
            raise DERError(f"object identifier arc longer than {MAX_ARC_BYTES} bytes")
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = size = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))
