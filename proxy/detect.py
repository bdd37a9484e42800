"""What a new inbound connection speaks, by peeking at its first bytes without consuming them."""

from __future__ import annotations

import asyncio
import enum
import socket
import time

from sidemesh.identity.tls import ALPN

_ALPN_WIRE = bytes([len(ALPN)]) + ALPN.encode()
PEEK_BYTES = 4096


class Kind(enum.Enum):
    MESH = "mesh"  # TLS offering ALPN sidemesh/1: another sidecar
    PLAINTEXT = "plaintext"  # anything else (including TLS the app originated)
    SILENT = "silent"  # nothing within the timeout (server-speaks-first protocols)
    CLOSED = "closed"


def classify(peeked: bytes) -> Kind | None:
    """None while more bytes are needed to decide."""
    if not peeked:
        return Kind.CLOSED
    if peeked[0] != 0x16:  # not a TLS handshake record
        return Kind.PLAINTEXT
    if _ALPN_WIRE in peeked:
        return Kind.MESH
    if len(peeked) >= 5:
        record = 5 + int.from_bytes(peeked[3:5], "big")
        if len(peeked) >= min(record, PEEK_BYTES):
            return Kind.PLAINTEXT
    return None


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def detect(sock: socket.socket, timeout: float) -> Kind:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        try:
            peeked = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            peeked = None
        except ConnectionError:
            return Kind.CLOSED
        if peeked is not None:
            kind = classify(peeked)
            if kind is not None:
                return kind
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Kind.SILENT if not peeked else Kind.PLAINTEXT
        if peeked:  # a partial ClientHello: the socket stays readable, so poll briefly
            await asyncio.sleep(min(0.005, remaining))
            continue
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _set_once, ready)
        try:
            await asyncio.wait_for(ready, remaining)
        except TimeoutError:
            return Kind.SILENT
        finally:
            loop.remove_reader(sock.fileno())
