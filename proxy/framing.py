"""The `sidemesh/1` stream between two sidecars, inside mTLS (no I/O).

TLS transports in Python cannot half-close, and the server sidecar must learn which port the
client meant (without iptables there is no original destination). So after the handshake the
stream is a sequence of frames, each a 5-byte header (type, length) and a payload:

    OPEN  (client -> server, first)  2-byte destination port
    DATA                             bytes of the application stream
    EOF                              the sender will send no more data (TCP half-close)
    DENY  (server -> client)         UTF-8 reason; the server closes after it
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

HEADER = struct.Struct("!BI")
OPEN, DATA, EOF, DENY = 1, 2, 3, 4
MAX_DATA = 256 * 1024  # what one DATA frame may carry
_KNOWN = {OPEN, DATA, EOF, DENY}


class FramingError(ValueError):
    pass


def open_frame(port: int) -> bytes:
    return HEADER.pack(OPEN, 2) + port.to_bytes(2, "big")


def data_header(length: int) -> bytes:
    return HEADER.pack(DATA, length)


EOF_FRAME = HEADER.pack(EOF, 0)


def deny_frame(reason: str) -> bytes:
    payload = reason.encode()[:1024]
    return HEADER.pack(DENY, len(payload)) + payload


class Decoder:
    """Bytes in, frames out. Keeps at most one partial frame buffered."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes | memoryview]]:
        """DATA payloads come out as views of ``data`` where they can (no copy; ``data`` is
        immutable); control payloads as bytes."""
        buf = self._buf
        if not buf and len(data) >= 5:
            # Fast path: whole frames straight from ``data`` without copying into the buffer.
            view = memoryview(data)
            pos = 0
            end = len(data)
            while end - pos >= 5:
                kind, length = HEADER.unpack_from(view, pos)
                self._check(kind, length)
                if end - pos - 5 < length:
                    break
                payload = view[pos + 5 : pos + 5 + length]
                yield kind, payload if kind == DATA else bytes(payload)
                pos += 5 + length
            if pos < end:
                buf += view[pos:]
            return
        buf += data
        while len(buf) >= 5:
            kind, length = HEADER.unpack_from(buf, 0)
            self._check(kind, length)
            if len(buf) - 5 < length:
                return
            copied = bytes(buf[5 : 5 + length])
            del buf[: 5 + length]
            yield kind, copied

    @staticmethod
    def _check(kind: int, length: int) -> None:
        if kind not in _KNOWN:
            raise FramingError(f"unknown frame type {kind}")
        if length > MAX_DATA:
            raise FramingError(f"frame of {length} bytes is larger than {MAX_DATA}")

    @property
    def pending(self) -> int:
        return len(self._buf)


def parse_open(payload: bytes) -> int:
    if len(payload) != 2:
        raise FramingError("OPEN frame must carry a 2-byte port")
    port = int.from_bytes(payload, "big")
    if port == 0:
        raise FramingError("OPEN frame names port 0")
    return port
