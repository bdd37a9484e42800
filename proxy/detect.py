"""What a new connection speaks, by peeking at its first bytes without consuming them.

``classify`` is pure (bytes in, a kind or "need more" out); ``detect`` is the I/O around it. While
the bytes peeked so far cannot decide, ``detect`` waits for *more* bytes, not for readability
(which a socket holding unread bytes always has): it raises the socket's receive low-water mark
(``SO_RCVLOWAT``) above what it already holds, so the loop wakes once per new segment instead of
polling. Nothing within the timeout: the client waits for the server to speak first (SILENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import select
import socket
import time

from sidemesh.identity.tls import ALPN

_ALPN_WIRE = bytes([len(ALPN)]) + ALPN.encode()
PEEK_BYTES = 8192  # what detection looks at (a longer request line: see _LONG_REQUEST)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Whatever an app's server takes as a request must be detected as one: carried as opaque, it
# reached the app unparsed, with the identity headers the caller wrote (x-forwarded-client-cert)
# and not the sidecar's. Servers are lenient: llhttp (Node, uvicorn) serves `GET /x`,
# `GET /x RTSP/1.0` and a version-less `CONNECT host:80`, h11 and Go methods of any length. So: a
# request line as llhttp reads one (runs of spaces, any HTTP version); a method then an
# origin-form, `*` or absolute-form target, then nothing or a version llhttp knows (HTTP, RTSP,
# ICE); CONNECT and an authority. The sidecar's parser answers what it does not serve (400, 414,
# 505). What follows a target otherwise is another protocol's (ICAP's `ICAP/1.0`, git's NUL).
# (Possessive quantifiers throughout: runs of spaces next to an optional part backtracked in
# quadratic time, 0.8 s of the event loop per 8 KiB `CONNECT` line from anyone who can connect.)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++ ++[^ \r\n]++ ++HTTP/[0-9]\.[0-9]\r?\n")
_AFTER_TARGET = rb"(?: ++(?:HTTP|RTSP|ICE)/[^\r\n]*+| *+)\r?\n"
_TARGET_LINE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++ ++(?:/|\*|[A-Za-z][A-Za-z0-9+.\-]*+://)[^ \r\n\x00]*+" + _AFTER_TARGET
)
_CONNECT_LINE = re.compile(rb"CONNECT ++[!$%&'()*+,\-./0-9:;=?@A-Z\[\]_a-z~]*+" + _AFTER_TARGET)


# Python's own servers (http.server, and so wsgiref and Werkzeug's and Django's development
# servers) read a request line their own way: CRs stripped, split on any whitespace (str.split:
# tabs, CR, VT, FF, \x1c-\x1f, NEL, NBSP in Latin-1), whatever comes first as the method, and
# `GET <path>` alone as HTTP/0.9, whose headers they still read. Such a line is HTTP here (the
# sidecar's parser refuses it: 400): as opaque it reached the app with the caller's own headers.
# Detection judges it once its LF is there. A relay on a port not declared opaque judges the
# first line too (``FirstLine``), whatever detection made of the first bytes (`\x16\x03` is a
# method to them), however long the line (they read 64 KiB) and when the stream ends first
# (their readline serves the line then), so a request split, padded or cut short is still caught.
LINE_MAX = 65537  # what http.server reads of a request line (longer: 414)


def python_request_line(line: bytes) -> bool:
    """Whether ``line`` (a first line without its LF) is a request to Python's http.server."""
    words = line.decode("latin-1").split()
    if len(words) == 3:
        return words[2].startswith("HTTP/")
    # HTTP/0.9: any target (Werkzeug routes `GET admin` as /admin; Redis's inline `GET key` on a
    # port not declared opaque is refused with it: clients send RESP arrays, and 6379 is opaque)
    return len(words) == 2 and words[0] == "GET"


def _compact(line: bytes) -> bytes | None:
    """A short stand-in for a first line still coming, with the same verdict whatever follows (its
    words, cut to 8 characters, one space apart, and whether it ends in whitespace); None when no
    ending makes it a request (more than three words)."""
    text = line.decode("latin-1").lstrip("\r\n")
    words = text.split()
    if len(words) > 3:
        return None
    return (" ".join(w[:8] for w in words) + (" " if text[-1:].isspace() else "")).encode("latin-1")


class FirstLine:
    """The first line of a stream, fed as it comes: whether it is a request to Python's
    http.server (``line_verdict``) once it has ended; at most about PEEK_BYTES kept however long
    it grows (64 KiB per undecided connection was too much for the connection limit's sizing)."""

    __slots__ = ("_kept", "_length")

    def __init__(self) -> None:
        self._kept = bytearray()
        self._length = 0  # bytes of it seen (up to LINE_MAX)

    def feed(self, data: bytes | memoryview) -> bool | None:
        start = len(self._kept)
        chunk = data[: LINE_MAX - self._length]
        self._kept += chunk
        self._length += len(chunk)
        if self._kept.find(b"\n", start) >= 0:
            verdict = line_verdict(bytes(self._kept))
            if verdict is not None:
                return verdict
        if self._length >= LINE_MAX:
            return False  # (http.server: 414)
        if len(self._kept) > PEEK_BYTES:
            short = _compact(bytes(self._kept))
            if short is None:
                return False
            self._kept = bytearray(short)
        return None

    def at_end(self) -> bool:
        """The stream ended (EOF, FIN) before the line did: whether it is a request all the same
        (readline gives Python's servers the line without its LF at the end of the stream)."""
        line = bytes(self._kept).lstrip(b"\r\n")
        return bool(line) and python_request_line(line)


def line_verdict(seen: bytes) -> bool | None:
    """Whether the first line (after empty ones) of ``seen`` is a request to Python's
    http.server; None while that line has not ended within ``LINE_MAX``."""
    line = seen.lstrip(b"\r\n")
    newline = line.find(b"\n")
    if newline < 0:
        return None if len(seen) < LINE_MAX else False
    return python_request_line(line[:newline])


class Kind(enum.Enum):
    MESH = "mesh"  # TLS offering ALPN sidemesh/1: another sidecar
    TLS = "tls"  # TLS originated by the app (carried as opaque TCP)
    HTTP1 = "http/1"  # an HTTP/1.0 or HTTP/1.1 request line
    H2 = "h2"  # the HTTP/2 connection preface (prior knowledge, as gRPC clients send)
    OPAQUE = "opaque"  # anything else: carried unchanged
    SILENT = "silent"  # nothing within the timeout (server-speaks-first protocols): opaque
    CLOSED = "closed"

    @property
    def http(self) -> bool:
        return self in (Kind.HTTP1, Kind.H2)


def _classify_tls(peeked: bytes) -> Kind | None:
    if _ALPN_WIRE in peeked:
        return Kind.MESH
    if len(peeked) >= 5:
        record = 5 + int.from_bytes(peeked[3:5], "big")
        if len(peeked) >= min(record, PEEK_BYTES):
            return Kind.TLS
    return None


def _classify_http1(peeked: bytes) -> Kind | None:
    full = len(peeked) >= PEEK_BYTES
    line = peeked.lstrip(b"\r\n")  # empty lines before a request are ignored (RFC 9112 2.2)
    if not line:  # (as many as llhttp skips: a peek of nothing else is a request still to come)
        return Kind.HTTP1 if full else None
    newline = line.find(b"\n")
    if newline >= 0 and python_request_line(line[:newline]):
        return Kind.HTTP1
    space = line.find(b" ")
    if space <= 0:
        if space == 0 or not _TOKEN.fullmatch(line):
            return Kind.OPAQUE
        # A method still coming; a peek of nothing else is one (a method of any length is a
        # token to h11 and Go, and no other protocol opens with 8 KiB of token characters).
        return Kind.HTTP1 if full else None
    if not _TOKEN.fullmatch(line, 0, space):
        return Kind.OPAQUE
    if newline < 0:
        # A method and spaces filling the peek, or a target still coming: a request line that
        # does not fit (a server reading lines of 16 KiB, Node's, or 1 MB, Go's, takes it).
        return Kind.HTTP1 if full else None
    end = newline + 1
    if (
        _REQUEST_LINE.match(line, 0, end)
        or _TARGET_LINE.match(line, 0, end)
        or _CONNECT_LINE.match(line, 0, end)
    ):
        return Kind.HTTP1
    return Kind.OPAQUE  # (`EHLO x`, `USER anonymous`, `get key`, `OPTIONS icap://x ICAP/1.0`)


def classify(peeked: bytes) -> Kind | None:
    """The kind of a connection whose first bytes are ``peeked``; None while more are needed."""
    if not peeked:
        return Kind.CLOSED
    if peeked[0] == 0x16 and peeked[1:2] in (b"", b"\x03"):  # a TLS handshake record (version 3.x)
        return _classify_tls(peeked)
    if peeked[:24] == H2_PREFACE[: len(peeked)]:
        return Kind.H2 if len(peeked) >= len(H2_PREFACE) else None
    return _classify_http1(peeked)


def need_after(peeked: bytes) -> int:
    """How many bytes the socket must hold before classifying again is worth it."""
    if len(peeked) >= 5 and peeked[0] == 0x16:
        return min(5 + int.from_bytes(peeked[3:5], "big"), PEEK_BYTES)
    return len(peeked) + 1


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _readable(sock: socket.socket, low_water: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    if low_water > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), _set_once, ready)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())
        if low_water > 1:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _ended(sock: socket.socket) -> bool:
    """Whether the peer has shut down its sending side, without reading anything."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def undecided_kind(peeked: bytes) -> Kind:
    """What the bytes seen so far count as when the timeout ends detection."""
    if not peeked:
        return Kind.SILENT
    return Kind.TLS if peeked[0] == 0x16 else Kind.OPAQUE


async def detect(sock: socket.socket, timeout: float) -> Kind:
    return (await detect_outcome(sock, timeout))[0]


async def detect_outcome(sock: socket.socket, timeout: float) -> tuple[Kind, bool]:
    """The kind, and whether the bytes decided it (False: the timeout did, see ``undecided_kind``)."""
    deadline = time.monotonic() + timeout
    peeked = b""
    woken = False
    while True:
        seen = len(peeked)
        try:
            peeked = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        except ConnectionError:
            return Kind.CLOSED, True  # reset
        else:
            if not peeked:
                # A half-close before any byte (`nc -N` with nothing to send, a client that only
                # listens): decided, opaque, its FIN passed on; a server that speaks first still
                # answers. (It was refused: the client got a reset.)
                return Kind.OPAQUE, True
            kind = classify(peeked)
            if kind is not None:
                return kind, True
            if woken and len(peeked) == seen and _ended(sock):
                # The client has half-closed: no more bytes will come and the timeout would decide
                # nothing (an ended socket is always readable: this loop would spin until then).
                return undecided_kind(peeked), True
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not await _readable(sock, need_after(peeked) if peeked else 1, remaining):
            return undecided_kind(peeked), False
        woken = True
