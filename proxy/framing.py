"""The `sidemesh/1` stream between two sidecars, inside mTLS (no I/O).

TLS transports in Python cannot half-close, and the server sidecar must learn which port the
client meant (without iptables there is no original destination). So after the handshake the
stream is a sequence of frames, each a 5-byte header (type, length) and a payload:

    OPEN  (client -> server, first)  2-byte destination port [+ 1-byte protocol hint]
    DATA                             bytes of the application stream
    EOF                              the sender will send no more data (TCP half-close); from a
                                     server, a payload of 0x01 says it is closing an idle
                                     connection and will answer UNREAD to what comes after
    DENY  (server -> client)         UTF-8 reason; the server closes after it
    UNREAD (server -> client, after its idle EOF, empty)  the server is closing an idle connection
                                     and dropped, unread, what came after its last response: a
                                     request sent then was never seen by the app, so the client
                                     sidecar may send it again elsewhere, a POST too (HTTP/2's
                                     GOAWAY says the same with its last stream ID)
    IDLE_CLOSE (either way, empty)   an opaque relay reached its idle timeout: the sender forwards
                                     nothing more from its app and closes in order once the other
                                     sidecar answers with an IDLE_CLOSE of its own (it ends its
                                     app's side with a FIN and closes the connection in order),
                                     or resets the connection when bytes are held either way (a
                                     stalled connection, not an idle one). A sidecar that does not
                                     know the frame resets the connection: what both did before
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!BI")
OPEN, DATA, EOF, DENY, UNREAD, IDLE_CLOSE = 1, 2, 3, 4, 5, 6
MAX_DATA = 256 * 1024  # what one DATA frame may carry
MAX_CONTROL = 4096  # OPEN, EOF, DENY, UNREAD: small, buffered whole
_KNOWN = {OPEN, DATA, EOF, DENY, UNREAD, IDLE_CLOSE}


class FramingError(ValueError):
    pass


# The protocol hint: what the client sidecar found the stream to carry, so that the server sidecar
# need not detect it again (and wait again for a server-speaks-first protocol). Absent: detect.
HINT_DETECT, HINT_OPAQUE, HINT_HTTP1, HINT_H2 = 0, 1, 2, 3


def open_frame(port: int, hint: int = HINT_DETECT) -> bytes:
    if hint == HINT_DETECT:
        return HEADER.pack(OPEN, 2) + port.to_bytes(2, "big")
    return HEADER.pack(OPEN, 3) + port.to_bytes(2, "big") + bytes([hint])


def data_header(length: int) -> bytes:
    return HEADER.pack(DATA, length)


EOF_FRAME = HEADER.pack(EOF, 0)
IDLE = b"\x01"  # an EOF's payload: an idle connection closing (UNREAD follows if a request comes)
EOF_IDLE_FRAME = HEADER.pack(EOF, 1) + IDLE
UNREAD_FRAME = HEADER.pack(UNREAD, 0)
IDLE_CLOSE_FRAME = HEADER.pack(IDLE_CLOSE, 0)


def deny_frame(reason: str) -> bytes:
    payload = reason.encode()[:1024]
    return HEADER.pack(DENY, len(payload)) + payload


MAX_EMPTY_DATA = 10  # empty DATA frames in a row before the stream is refused


class Decoder:
    """Bytes in, frames out, streaming: a DATA frame's payload is passed on in pieces as views of
    the bytes fed (never reassembled); only headers and the small control frames are buffered. So
    a DATA frame may come out as several ``(DATA, piece)``, one per read it spans; three or more
    DATA frames of one read between two control frames come out as one piece (``_joined``)."""

    __slots__ = ("_control", "_empty", "_head", "_kind", "_remaining")

    def __init__(self) -> None:
        self._head = bytearray()  # a partial header
        self._kind = 0  # the frame being read, 0 between frames
        self._remaining = 0  # its payload bytes still to come
        self._control = bytearray()  # a partial control payload
        self._empty = 0  # empty DATA frames in a row (none is sent; a flood of them is refused)

    def feed(self, data: bytes) -> list[tuple[int, bytes | memoryview]]:
        view = memoryview(data)
        if self._one_data_frame(data):  # (fast: uncopied)
            return [(DATA, view[5:])]
        out: list[tuple[int, bytes | memoryview]] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._kind == 0:  # reading a header
                if not self._head and end - pos >= 5:
                    kind, length = HEADER.unpack_from(view, pos)
                    pos += 5
                else:
                    take = min(5 - len(self._head), end - pos)
                    self._head += view[pos : pos + take]
                    pos += take
                    if len(self._head) < 5:
                        break
                    kind, length = HEADER.unpack(self._head)
                    self._head.clear()
                self._check(kind, length)
                if length == 0 and kind == DATA:
                    # Carries nothing and is never sent: decoding a flood of them costs ~65x the
                    # CPU per byte of real DATA, and no read limit ever pauses it (HTTP/2's
                    # empty-frame flood, CVE-2019-9518; the HTTP/2 side refuses more than 10 too).
                    self._empty += 1
                    if self._empty > MAX_EMPTY_DATA:
                        raise FramingError(f"more than {MAX_EMPTY_DATA} empty DATA frames in a row")
                    continue
                self._empty = 0
                if length == 0:
                    out.append((kind, b""))
                    continue
                self._kind, self._remaining = kind, length
                continue
            take = min(self._remaining, end - pos)
            piece = view[pos : pos + take]
            pos += take
            self._remaining -= take
            if self._kind == DATA:
                out.append((DATA, piece))
            else:
                self._control += piece
                if self._remaining == 0:
                    out.append((self._kind, bytes(self._control)))
                    self._control.clear()
            if self._remaining == 0:
                self._kind = 0
        return _joined(out) if len(out) > 1 else out

    def whole_data(self, data: bytes) -> bytes | None:
        """The payload when ``data`` is exactly one whole DATA frame with bytes in it, begun at a
        frame boundary (most reads of a pooled connection: a message), as ``feed`` would give it;
        else None, and nothing is taken (``feed`` decodes it)."""
        return data[5:] if self._one_data_frame(data) else None

    def _one_data_frame(self, data: bytes) -> bool:
        """``data`` is exactly one whole DATA frame with bytes in it, begun at a frame boundary
        (taken: the empty frames' count is reset)."""
        if self._kind == 0 and not self._head and len(data) > 5 and data[0] == DATA:
            length = HEADER.unpack_from(data)[1]
            if length == len(data) - 5 and length <= MAX_DATA:
                self._empty = 0
                return True
        return False

    @staticmethod
    def _check(kind: int, length: int) -> None:
        if kind not in _KNOWN:
            raise FramingError(f"unknown frame type {kind}")
        if length > MAX_DATA:
            raise FramingError(f"frame of {length} bytes is larger than {MAX_DATA}")
        if kind != DATA and length > MAX_CONTROL:
            raise FramingError(f"control frame of {length} bytes is larger than {MAX_CONTROL}")

    @property
    def pending(self) -> int:
        return len(self._head) + len(self._control) + self._remaining


def _joined(frames: list[tuple[int, bytes | memoryview]]) -> list[tuple[int, bytes | memoryview]]:
    """Three or more DATA pieces of one read between two control frames as one: a peer sending
    1-byte DATA frames made a write (a system call) and a buffered object per frame, 6 bytes on the
    wire each: a core's worth of CPU for a few MB/s, and up to about 11 MB held (an object per
    byte, up to the 256 KiB read limit) on a connection whose reader had stopped. Our sidecars send
    a DATA frame per read of their app's socket, so a read of many is a backlog: it goes on in one
    write, as the app's bytes would. Two pieces stay two (not joined: the relay passes them on as
    views): a bulk transfer's read holds the end of one large frame and the start of the next."""
    out: list[tuple[int, bytes | memoryview]] = []
    run: list[bytes | memoryview] = []
    for kind, payload in frames:
        if kind == DATA:
            run.append(payload)
            continue
        _end_run(out, run)
        out.append((kind, payload))
    _end_run(out, run)
    return out


def _end_run(out: list[tuple[int, bytes | memoryview]], run: list[bytes | memoryview]) -> None:
    if len(run) > 2:
        out.append((DATA, b"".join(run)))
    else:
        out.extend((DATA, piece) for piece in run)
    run.clear()


def parse_open(payload: bytes) -> int:
    return parse_open_hint(payload)[0]


def parse_open_hint(payload: bytes) -> tuple[int, int]:
    """The port and the protocol hint (HINT_DETECT when the frame carries none)."""
    if len(payload) not in (2, 3):
        raise FramingError("OPEN frame must carry a 2-byte port and an optional 1-byte hint")
    port = int.from_bytes(payload[:2], "big")
    if port == 0:
        raise FramingError("OPEN frame names port 0")
    hint = payload[2] if len(payload) == 3 else HINT_DETECT
    if hint not in (HINT_DETECT, HINT_OPAQUE, HINT_HTTP1, HINT_H2):
        raise FramingError(f"OPEN frame carries an unknown protocol hint {hint}")
    return port, hint
