"""HTTP/1.x through a sidecar pair as on a direct connection, where an audit (2026-12-07) found them
to differ: each case with real sockets and bytes the test chooses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import StartCA
from tests.integration.mesh_fixture import Mesh, new_mesh
from tests.integration.test_http1 import ALLOW_CART_PATHS, raw_app_pair


@pytest.fixture
async def mesh(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Mesh]:
    m = new_mesh(await start_ca(), tmp_path, ALLOW_CART_PATHS)
    yield m
    await m.close()


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """Until EOF, a reset, or ``timeout`` without bytes (what the client got, whatever the end)."""
    out = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            out += chunk
    return out


# -- 1. A response the app cut short (or broke) after its head: the head was thrown away ----------


@pytest.mark.parametrize(
    "cut",
    [
        # a chunk, then a malformed chunk size: the app answered, its response is broken mid-body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
        # the app crashes after the head and part of the body (FIN, as a dying process's socket)
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
    ],
    ids=["malformed-chunk", "truncated-length"],
)
async def test_a_response_broken_after_its_head_is_not_sent_again_and_its_head_reaches_the_client(
    mesh: Mesh, cut: bytes
) -> None:
    """Direct, the client gets the app's 200 head and what body came, then the connection ends
    (truncation it can see). Through the pair, the server sidecar relays the head and body with
    ``Pipe.write`` (queued until the end of the loop's turn) and, on the upstream failure in the
    same turn, ``down.abort()`` clears that queue and resets: the client sidecar sees its pooled
    connection reset before any response byte, takes it for "closed under the request" and sends
    the GET again on a fresh connection (the app gets it twice), then answers 502. RFC 9112 9.3.1
    allows an automatic retry only when no response was received; the app answered. Envoy flushes
    what it relayed and closes (FlushWriteAndDelay) when an upstream fails mid-response."""
    seen: list[str] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n")[0].decode()
                seen.append(line)
                if "/cart/cut" in line:
                    writer.write(cut)
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async with raw_app_pair(mesh, app) as addr:
        for attempt in range(3):
            seen.clear()
            reader, writer = await asyncio.open_connection(*addr)
            try:
                writer.write(
                    b"GET /cart/warm HTTP/1.1\r\nHost: cart\r\n\r\n"
                )  # the pooled connection: reused
                await asyncio.wait_for(reader.readuntil(b"ok"), 5)
                writer.write(b"GET /cart/cut HTTP/1.1\r\nHost: cart\r\n\r\n")
                got = await _read_all(reader, 3)
            finally:
                writer.close()
            assert seen.count("GET /cart/cut HTTP/1.1") == 1, (attempt, seen)
            assert got.startswith(b"HTTP/1.1 200 "), (attempt, got)
